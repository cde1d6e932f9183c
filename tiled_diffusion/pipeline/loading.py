"""Load a diffusers PixArt folder with int8 layers built while the weights stream in.

`from_pretrained` followed by `quantize_model` holds the whole float model first: for PixArt's T5-XXL that is
9.5 GB in bf16 (19 GB in fp32 while it is cast) before the int8 copy (4.7 GB) exists. `load_pipeline` builds the
text encoder and the transformer from their config.json with parameters on the meta device, reads the safetensors
files tensor by tensor (plain reads into freshly allocated tensors: no mmap of a multi-GB shard is left mapped, so
the shard's pages never count in the process's RSS), casts each tensor as `from_pretrained` would, and swaps every
nn.Linear for an `Int8Linear` as soon as its weight and bias are in. Peak memory is the int8 model plus the largest
float layer. The VAE, tokenizer and scheduler (small) load with the normal `from_pretrained`.

The result is what `from_pretrained` + `int8.quantize_model` gives, bitwise (same float values into the same
`Int8Linear.from_linear`), with the layer choice of `accelerate`: T5 weight-only ("w8a16"), the transformer in the
requested mode except `int8.PIXART_KEEP_HIGH_PRECISION`.

Construction puts parameters on the meta device and keeps buffers real, which is what diffusers does through
`accelerate.init_empty_weights()`: a plain `with torch.device("meta")` would also leave non-persistent buffers
(PatchEmbed's sincos `pos_embed`) on meta, and they are not in any checkpoint to be loaded back.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]} (relative to the data start, 8 + N), "__metadata__": {...}}, then the data.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import struct
from typing import Callable, Iterable, Optional

import diffusers
import torch
from torch import nn

from ..model import int8 as I

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_DTYPES.update({k: getattr(torch, v) for k, v in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
                   if hasattr(torch, v)})

# Weight file names per library: (single file, index of a sharded checkpoint).
_WEIGHT_FILES = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "transformers": ("model.safetensors", "model.safetensors.index.json"),
}


class LoadError(ValueError):
    """A folder whose weights do not fit the model its config describes."""


# ----------------------------------------------------------------------------------------- safetensors


def read_header(path: str) -> tuple[dict, int]:
    """(entries without __metadata__, absolute offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LoadError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise LoadError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(path: str, keys: Optional[Iterable[str]] = None):
    """Yield (name, tensor) for the tensors of one file (all, or `keys`), in file order, each read with plain
    reads into its own freshly allocated CPU tensor (nothing stays mapped)."""
    header, base = read_header(path)
    names = list(header) if keys is None else [k for k in keys if k in header]
    names.sort(key=lambda k: header[k]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name in names:
            e = header[name]
            if e["dtype"] not in _ST_DTYPES:
                raise LoadError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which this loader does not read")
            begin, end = e["data_offsets"]
            t = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
            nbytes = t.numel() * t.element_size()
            if end - begin != nbytes:
                raise LoadError(f"{path}: tensor {name!r} is {end - begin} bytes, shape {e['shape']} {e['dtype']} "
                                f"needs {nbytes}")
            if nbytes:
                buf = memoryview(t.view(-1).view(torch.uint8).numpy())
                f.seek(base + begin)
                got = 0
                while got < nbytes:  # readinto may return short counts on large reads
                    r = f.readinto(buf[got:])
                    if not r:
                        raise LoadError(f"{path}: truncated at tensor {name!r}")
                    got += r
            yield name, t


def checkpoint_files(folder: str, library: str) -> Optional[dict[str, list[str]]]:
    """{file path: [tensor names]} of a component folder's safetensors checkpoint (one file or an index of
    shards), or None when the folder holds none."""
    single, index = _WEIGHT_FILES[library]
    ipath = os.path.join(folder, index)
    if os.path.isfile(ipath):
        with open(ipath) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(os.path.join(folder, fname), []).append(key)
        return files
    spath = os.path.join(folder, single)
    if os.path.isfile(spath):
        return {spath: list(read_header(spath)[0])}
    return None


# ------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory, no init work); buffers stay real, so the ones a
    module computes at init and never saves (non-persistent) come out right. Ties made at init (the same
    Parameter registered twice) stay ties."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build(model_cls, folder: str, library: str, dtype: torch.dtype) -> nn.Module:
    """The model of `folder/config.json`, parameters on meta. transformers builds in the target dtype (as its
    from_pretrained does: a parameter made in another dtype at init keeps it), diffusers in fp32."""
    if library == "diffusers":
        config = model_cls.load_config(folder)
        with _parameters_on_meta():
            model = model_cls.from_config(config)
        model.register_to_config(_name_or_path=folder)
    else:
        config = model_cls.config_class.from_pretrained(folder)
        with _parameters_on_meta(), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
            model = model_cls(config)
        model.config.name_or_path = folder
    return model.eval()


def _fp32_rule(model: nn.Module, library: str, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which checkpoint keys from_pretrained keeps in fp32 (`_keep_in_fp32_modules`), by each library's rule."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "diffusers":  # any dtype; a module name is a whole component of the key
        return lambda key: any(m in key.split(".") for m in keep)
    # transformers: `_keep_in_fp32_modules` only against fp16, `_strict` against fp16 and bf16; regex search
    pats = keep if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        pats += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not pats:
        return lambda key: False
    rx = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in pats))
    return lambda key: rx.search(key) is not None


def _ignored(model: nn.Module, attr: str) -> Callable[[str], bool]:
    pats = [p for p in (getattr(model, attr, None) or []) if p]
    rx = re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None
    return lambda key: rx is not None and rx.search(key) is not None


# ------------------------------------------------------------------------------------------- loading


def load_component(folder: str, model_cls, library: str, dtype: torch.dtype, mode: Optional[str],
                   exclude: Iterable[str] = ()) -> nn.Module:
    """One model (text encoder or transformer) of a pipeline folder, its nn.Linear layers already Int8Linear
    (`mode`: "w8a8" | "w8a16"; names matching `exclude` stay float) or, with mode None, float.

    Raises LoadError naming missing / unexpected / mis-shaped keys. A folder with no safetensors checkpoint
    falls back to `from_pretrained` + `quantize_model`.
    """
    files = checkpoint_files(folder, library)
    if files is None:
        model = model_cls.from_pretrained(folder, dtype=dtype)
        if mode is not None:
            I.quantize_model(model, mode=mode, exclude=tuple(exclude))
        return model

    model = _build(model_cls, folder, library, dtype)
    keep_fp32 = _fp32_rule(model, library, dtype)
    ignore_unexpected = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    ignore_missing = _ignored(model, "_keys_to_ignore_on_load_missing")

    # Every slot (module, attribute) of every parameter / persistent buffer, grouped by the tensor they hold, so
    # that tied parameters get one loaded tensor. A group's canonical key is its first name in state-dict order.
    groups: dict[int, dict] = {}
    key_to_group: dict[str, dict] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        tensors = [(n, p, "param") for n, p in module._parameters.items() if p is not None]
        tensors += [(n, b, "buffer") for n, b in module._buffers.items()
                    if b is not None and n not in module._non_persistent_buffers_set]
        for n, t, kind in tensors:
            g = groups.setdefault(id(t), {"keys": [], "slots": [], "kind": kind, "meta": t, "loaded": False})
            g["keys"].append(prefix + n)
            g["slots"].append((module, n))
            key_to_group[prefix + n] = g
    canonical = {g["keys"][0] for g in groups.values()}

    # The layers to quantize: quantize_model's own selection (int8.linear_targets).
    targets: dict[int, dict] = {}
    if mode is not None:
        for name, m in I.linear_targets(model, exclude=exclude):
            targets[id(m)] = {"module": m, "name": name, "need": {id(m.weight)} | (
                {id(m.bias)} if m.bias is not None else set())}
    parents = {}  # id(module) -> [(parent, child name)]: every place a target sits in the tree
    for _, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is not None and id(child) in targets:
                parents.setdefault(id(child), []).append((parent, cname))
    waiting = {}  # id(meta tensor) -> target ids needing it
    for tid, tg in targets.items():
        for pid in tg["need"]:
            waiting.setdefault(pid, []).append(tid)

    unexpected, mismatched = [], []
    present = {k for keys in files.values() for k in keys}
    for path, keys in files.items():
        wanted = []
        for k in keys:
            g = key_to_group.get(k)
            if g is None:
                if not ignore_unexpected(k):
                    unexpected.append(k)
            elif k in canonical or not any(c in present for c in g["keys"] if c in canonical):
                wanted.append(k)  # an alias is read only when the checkpoint lacks the canonical key
        for key, t in iter_safetensors(path, wanted):
            g = key_to_group[key]
            if g["loaded"]:
                continue
            meta = g["meta"]
            if tuple(t.shape) != tuple(meta.shape):
                mismatched.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(meta.shape)}")
                g["bad"] = True
                continue
            if t.is_floating_point():
                target = torch.float32 if keep_fp32(key) else (meta.dtype if library == "transformers" else dtype)
                if t.dtype != target:
                    t = t.to(target)
            value = nn.Parameter(t, requires_grad=meta.requires_grad) if g["kind"] == "param" else t
            for module, n in g["slots"]:
                (module._parameters if g["kind"] == "param" else module._buffers)[n] = value
            g["loaded"], g["slots"] = True, []  # no reference left here once its layer is swapped
            for tid in waiting.pop(id(meta), []):
                tg = targets[tid]
                tg["need"].discard(id(meta))
                if not tg["need"]:
                    # inference only: on the CPU a W8A8 layer keeps just the kernel's packed copy (pack_only_)
                    q = I.Int8Linear.from_linear(tg["module"], mode).pack_only_()
                    for parent, cname in parents.pop(tid, []):
                        parent._modules[cname] = q
                    tg["module"] = None  # the float layer is gone with its last reference
            del t, value

    missing = [g["keys"][0] for g in groups.values() if not g["loaded"] and not g.get("bad")
               and not any(ignore_missing(k) for k in g["keys"])]
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:8])}{more}")
        raise LoadError(f"{folder}: the checkpoint does not match {model_cls.__name__} from its config.json: "
                        + "; ".join(parts))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # an ignored-missing key, or a buffer created on meta by the model itself
        raise LoadError(f"{folder}: {model_cls.__name__} has tensors no checkpoint key fills: {', '.join(leftover)}")
    return model


def _component_class(index: dict, name: str):
    entry = index.get(name)
    if not entry or entry[0] not in _WEIGHT_FILES:
        raise LoadError(f"model_index.json: component {name!r} is {entry!r}, expected a diffusers or "
                        f"transformers model")
    return entry[0], getattr(importlib.import_module(entry[0]), entry[1])


PIPELINE_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def load_pipeline(folder: str, dtype: torch.dtype, int8: Optional[str], components: Optional[Iterable[str]] = None):
    """A PixArt-α/Σ pipeline from a local diffusers folder, on the CPU.

    int8 None: plain `from_pretrained`. int8 "w8a8" / "w8a16": the transformer's linear layers in that mode
    (except `int8.PIXART_KEEP_HIGH_PRECISION`) and the T5 text encoder's weight-only ("w8a16"), each built as its
    weights stream in (see the module docstring); the rest loads with `from_pretrained`.
    components: the names to load (default all of PIPELINE_COMPONENTS); the others are None in the pipeline, so
    that T5 and the transformer need not be in memory together.
    """
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    pipe_cls = getattr(diffusers, index["_class_name"])
    wanted = set(PIPELINE_COMPONENTS if components is None else components)
    if not wanted <= set(PIPELINE_COMPONENTS):
        raise ValueError(f"load_pipeline: unknown components {sorted(wanted - set(PIPELINE_COMPONENTS))}")
    parts = {name: None for name in PIPELINE_COMPONENTS if name not in wanted}
    if int8 is None:
        return pipe_cls.from_pretrained(folder, dtype=dtype, **parts)
    if int8 not in I.MODES:
        raise ValueError(f"load_pipeline: int8 must be one of {I.MODES} or None, got {int8!r}")
    for name, mode, exclude in (("text_encoder", "w8a16", ()),
                                ("transformer", int8, I.PIXART_KEEP_HIGH_PRECISION)):
        if name not in wanted:
            continue
        library, cls = _component_class(index, name)
        parts[name] = load_component(os.path.join(folder, name), cls, library, dtype, mode, exclude)
    return pipe_cls.from_pretrained(folder, dtype=dtype, **parts)
