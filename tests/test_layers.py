"""The package's import graph: no cycles, and imports point down the layers only.

Every `import` / `from ... import` in the package is read from the source (function-local ones included, since
they are cycles too, only deferred), resolved to a module of the package, and checked against LAYERS: a module may
import modules of its own layer or of lower layers, and no set of modules may import each other in a cycle.
"""
from __future__ import annotations

import ast
import importlib
import os
import sys

import pytest

import tiled_diffusion
from tiled_diffusion import _compat
from tests.helpers import run_python

PKG_DIR = os.path.dirname(tiled_diffusion.__file__)

# Lowest first. A module belongs to the first entry that is a prefix of its dotted name (after "tiled_diffusion.").
LAYERS = [
    ["_native", "reference"],
    ["backends"],
    ["ops"],
    ["core"],
    ["model"],
    ["vae"],
    ["parallel"],
    ["pipeline"],
    ["tools", "lab", "tiny"],
    ["cli", "__main__"],
]


def _modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PKG_DIR)[:-3].replace(os.sep, ".")
                name = "tiled_diffusion" if rel == "__init__" else "tiled_diffusion." + rel.removesuffix(".__init__")
                found[name] = os.path.join(root, f)
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest prefix of `name` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in MODULES:
            return head
    return None


def _imports(module: str, path: str) -> set[str]:
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` depends on pkg.sub; `from mod import name` on mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("tiled_diffusion"):
                target = _resolve(n)
                # a module's own ancestors are initialised before it whatever it imports: not an edge
                if target and target != module and not module.startswith(target + "."):
                    out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    rest = module.removeprefix("tiled_diffusion.")
    for i, names in enumerate(LAYERS):
        if any(rest == n or rest.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    # the checker must see the package's real edges, or the tests below pass on nothing
    assert len(MODULES) > 30
    assert "tiled_diffusion.ops" in GRAPH["tiled_diffusion.model.attention"]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "tiled_diffusion"))
def test_imports_point_down(module):
    up = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert up == [], f"{module} (layer {_layer(module)}) imports higher layers: {up}"


def test_import_loads_neither_diffusers_nor_inductor():
    # `import tiled_diffusion` stays light (0.05 s after torch, measured; it was 1.6 s when registering the Triton
    # ops imported torch._inductor): the ops register, diffusers and inductor load only with the model layer.
    code = ("import sys, torch; import tiled_diffusion; "
            "print(sorted(m for m in ('diffusers', 'torch._inductor', 'transformers') if m in sys.modules))")
    out = run_python("-c", code, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_triton_ops_register_on_first_use():
    code = ("import torch, tiled_diffusion.ops as ops; "
            "before = hasattr(torch.ops.tiled_diffusion, 'seam_blend'); ops.register_triton_ops(); "
            "print(before, hasattr(torch.ops.tiled_diffusion, 'seam_blend'))")
    out = run_python("-c", code, timeout=120, check=True)
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout + out.stderr


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_flat_layout_paths_still_import(old):
    new = importlib.import_module(f"tiled_diffusion.{_compat.MOVED[old]}")
    with pytest.warns(DeprecationWarning, match=f"tiled_diffusion.{old} moved"):
        mod = importlib.import_module(f"tiled_diffusion.{old}") if f"tiled_diffusion.{old}" not in sys.modules \
            else _reimport(f"tiled_diffusion.{old}")
    assert mod is new  # one module object: state (caches, registries) is shared


def _reimport(name: str):
    del sys.modules[name]
    return importlib.import_module(name)
