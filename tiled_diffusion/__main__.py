"""`python -m tiled_diffusion ...` (and `torchrun --nproc-per-node N -m tiled_diffusion generate ...`): the CLI."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
