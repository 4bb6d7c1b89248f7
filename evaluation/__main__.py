"""`python -m evaluation ...` is `lightspan eval ...` (so `torchrun -m evaluation ...` works)."""
import sys

from .cli import main

sys.exit(main())
