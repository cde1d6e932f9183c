"""The module paths of the flat layout (before the package was layered) keep working for one release.

`import tiled_diffusion.canvas` (or `from tiled_diffusion import loading`) finds the module at its new home, warns
once with a DeprecationWarning naming it, and binds the same module object under the old name, so state is shared.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old submodule of tiled_diffusion -> its new dotted path under tiled_diffusion
    "attention": "model.attention", "canvas": "model.canvas", "controlnet": "model.controlnet",
    "int8": "model.int8", "positional": "model.positional", "regions": "model.regions",
    "tiling": "core.tiling", "lcm": "core.lcm", "distributed": "parallel",
    "sampler": "pipeline.sampler", "img2img": "pipeline.images", "loading": "pipeline.loading",
    "edges": "pipeline.edges", "cli_generate": "cli.generate", "cli_upscale": "cli.upscale",
    "inspect": "tools.inspect", "metrics": "tools.metrics", "cpu": "backends.cpu",
    "triton_kernels": "backends.triton",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    @staticmethod
    def new_name(fullname: str):
        """tiled_diffusion.<old>[.<rest>] -> tiled_diffusion.<new>[.<rest>], or None."""
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "tiled_diffusion" or parts[1] not in MOVED:
            return None
        return ".".join(["tiled_diffusion", MOVED[parts[1]], *parts[2:]])

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if self.new_name(fullname) else None

    def create_module(self, spec):
        new = self.new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed; the import system binds it under the old name too


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy
