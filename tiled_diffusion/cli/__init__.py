"""The command line: `tiled-diffusion {generate,upscale,bench,inspect}` (`main`), one module per subcommand."""
from .commands import main

__all__ = ["main"]
