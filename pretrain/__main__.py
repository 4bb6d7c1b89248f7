"""`python -m pretrain` (and `torchrun -m pretrain`) is `lightspan train`."""
import sys

from pretrain.train import main

sys.exit(main())
