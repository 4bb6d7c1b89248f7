"""`python -m pretrain` (and `torchrun -m pretrain`) is `lightspan train`, inside the CLI error boundary."""
import sys

from pretrain.errors import run_cli
from pretrain.train import main

sys.exit(run_cli(main))
