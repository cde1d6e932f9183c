"""Checks of a CLI request that run before any model loads (issue 22): every mistake is one line and exit 2 within
seconds — output paths, flag ranges, conflicting flags, the device, the model folder's parts — and the memory
limit a request is checked against defaults to what the machine has.

Reads only configs, safetensors headers and file sizes; builds models on the meta device at most.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import torch

from ..lab.models import SCHEDULER_CONFIG


class RequestError(ValueError):
    """A bad request, reported before any heavy work starts."""


# ------------------------------------------------------------------------------------------ output paths


def check_output(flag: str, path: Optional[str]) -> None:
    """`path` can be written atomically (a temp file beside it, then a rename): not empty, not a folder, under a
    folder (existing or creatable) where this process can create files. Probed by creating and removing a file,
    which is what the write will do (permission bits alone say nothing for root or a read-only mount)."""
    if path is None:
        return
    if not path.strip():
        raise RequestError(f"{flag}: empty path")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise RequestError(f"{flag} {path!r} is a folder; give a file name (e.g. {os.path.join(path, 'image.png')})")
    parent = os.path.dirname(full)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RequestError(f"{flag} {path!r}: {existing!r} is a file, not a folder")
    probe = os.path.join(existing, f".td-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise RequestError(f"{flag} {path!r}: cannot write in {existing!r} ({e.strerror})") from None


def check_outputs(out: Optional[str], json_path: Optional[str]) -> None:
    check_output("--out", out)
    check_output("--json", json_path)
    if out and json_path and os.path.realpath(out) == os.path.realpath(json_path):
        raise RequestError(f"--json {json_path!r} is the same file as --out: the report would overwrite the image")


# ----------------------------------------------------------------------------------------------- ranges


def check_number(flag: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False) -> None:
    """A finite number within [lo, hi] ((lo, hi] with lo_open)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise RequestError(f"{flag} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RequestError(f"{flag} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise RequestError(f"{flag} must be <= {hi:g}, got {value:g}")


def check_seed(seed: int) -> None:
    """torch.Generator.manual_seed takes 0 .. 2**64 - 1."""
    if not 0 <= seed < 2**64:
        raise RequestError(f"--seed must be in [0, 2**64), got {seed}")


def check_text(flag: str, text: Optional[str]) -> None:
    """Text that a tokenizer can read: arguments that were not UTF-8 arrive with surrogate escapes."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{flag}: not valid UTF-8 text (check the terminal's or the script's encoding)") from None


def check_device(text: Optional[str]) -> Optional[torch.device]:
    """--device parsed and present on this machine (None: the default choice)."""
    if text is None:
        return None
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise RequestError(f"--device {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError(f"--device {text!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RequestError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise RequestError(f"--device {text!r}: only cpu and cuda are supported")
    return dev


def check_nproc(nproc: Optional[int]) -> None:
    if nproc is not None and nproc < 1:
        raise RequestError(f"--nproc must be >= 1, got {nproc}")


# Flags that only one mode reads, with their defaults: set for another mode, they would be silently ignored.
MODE_FLAGS = {
    "radius": ("cross_tile", 1), "shift": ("cross_tile", False), "head_chunk": ("cross_tile", None),
    "overlap": ("multidiffusion", 0.5), "profile": ("multidiffusion", "cosine"),
    "tile_batch_size": ("multidiffusion", None),
}


def check_conflicts(args) -> None:
    """Refuse a flag the chosen mode ignores (set to something other than its default)."""
    for name, (mode, default) in MODE_FLAGS.items():
        value = getattr(args, name, default)
        if args.mode != mode and value != default:
            raise RequestError(f"--{name.replace('_', '-')} is a {mode} setting; --mode {args.mode} ignores it "
                               f"(drop it or use --mode {mode})")
    if args.mode == "global" and getattr(args, "tile", None) is not None:
        raise RequestError("--tile has no effect with --mode global (one canvas-wide attention); drop it")


# ------------------------------------------------------------------------------------------ model folder


def _json(model: str, rel: str) -> dict:
    path = os.path.join(model, rel)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RequestError(f"--model {model!r}: {rel} is missing") from None
    except (OSError, ValueError) as e:
        raise RequestError(f"--model {model!r}: cannot read {rel} ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(f"--model {model!r}: {rel} is not a JSON object")
    return data


def scheduler_config(model: str) -> dict:
    if model == "tiny":
        return {"_class_name": "LCMScheduler", **SCHEDULER_CONFIG}
    return _json(model, os.path.join("scheduler", "scheduler_config.json"))


def check_steps(model: str, steps: int) -> None:
    """Steps the model's scheduler can schedule: LCM picks them from original_inference_steps (50), the others
    from the training timesteps."""
    cfg = scheduler_config(model)
    if cfg.get("_class_name") == "LCMScheduler":
        most, why = int(cfg.get("original_inference_steps", 50)), "the LCM scheduler's original_inference_steps"
    else:
        most, why = int(cfg.get("num_train_timesteps", 1000)), "the scheduler's training timesteps"
    if not 1 <= steps <= most:
        raise RequestError(f"--steps must be in [1, {most}] ({why}), got {steps}")


def _weights(model: str, component: str, library: str) -> dict:
    """{tensor name: (shape, dtype)} from the component's safetensors headers, each file's size checked."""
    from ..pipeline.loading import LoadError, checkpoint_files, read_header  # loads diffusers: checks run before it

    folder = os.path.join(model, component)
    try:
        files = checkpoint_files(folder, library)
        if not files:
            raise LoadError(f"no safetensors weights in {component}/")
        out = {}
        for path in files:
            header, base = read_header(path)
            size = os.path.getsize(path)
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if base + end > size:
                raise LoadError(f"{os.path.relpath(path, model)} is truncated ({size} bytes, its header needs "
                                f"{base + end})")
            out.update({k: (tuple(e["shape"]), e["dtype"]) for k, e in header.items()})
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:  # LoadError is a ValueError
        raise RequestError(f"--model {model!r}: {component}: {e}") from None


def _meta_model(model: str, component: str, cls):
    """The model its config describes, built on the meta device (no memory): a bad config fails here."""
    cfg = _json(model, os.path.join(component, "config.json"))
    try:
        with torch.device("meta"):
            return cls.from_config(cfg)
    except Exception as e:  # any config mistake diffusers trips on (types, missing keys, bad values)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RequestError(f"--model {model!r}: {component}/config.json does not describe a "
                           f"{cls.__name__} ({first})") from None


def check_model_folder(model: str, components=("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
                       ) -> None:
    """Every part a run loads is present and readable: the tokenizer's files, the scheduler's config, each model's
    config (built on meta) and its weights (headers, file sizes; the diffusers models' keys and shapes)."""
    if model == "tiny":
        return
    import diffusers  # not at the top: a bad request fails before diffusers loads (seconds)

    index = _json(model, "model_index.json")
    for name in components:
        entry = index.get(name)
        if not entry or not isinstance(entry, list) or entry[0] is None:
            raise RequestError(f"--model {model!r}: model_index.json names no {name}")
        if not os.path.isdir(os.path.join(model, name)):
            raise RequestError(f"--model {model!r}: the {name}/ folder is missing")
    if "tokenizer" in components:
        tok = os.path.join(model, "tokenizer")
        if not any(os.path.isfile(os.path.join(tok, f)) for f in ("tokenizer.json", "spiece.model")):
            raise RequestError(f"--model {model!r}: tokenizer/ holds neither tokenizer.json nor spiece.model")
    if "scheduler" in components:
        scheduler_config(model)
    if "text_encoder" in components:
        _json(model, os.path.join("text_encoder", "config.json"))
        _weights(model, "text_encoder", "transformers")
    for name in ("transformer", "vae"):
        if name not in components:
            continue
        cls = getattr(diffusers, index[name][1], None)
        if cls is None:
            raise RequestError(f"--model {model!r}: model_index.json names an unknown {name} class {index[name][1]!r}")
        meta = _meta_model(model, name, cls)
        have = _weights(model, name, "diffusers")
        want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        missing = sorted(set(want) - set(have))
        if missing:  # the loader refuses these too, after minutes of reading: say it now
            raise RequestError(f"--model {model!r}: {name} weights lack {len(missing)} of {len(want)} tensors; "
                               f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        bad = sorted(k for k in want if have[k][0] != want[k])
        if bad:
            raise RequestError(f"--model {model!r}: {name} tensor {bad[0]} is {list(have[bad[0]][0])}, its config "
                               f"needs {list(want[bad[0]])}")


# ---------------------------------------------------------------------------------------------- memory


def machine_memory_gb(device: torch.device) -> float:
    """What the request may use by default: the GPU's memory, or the host's RAM (the cgroup's limit if lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw.isdigit():
                total = min(total, int(raw))
        except OSError:
            pass
    return total / 2**30


# ---------------------------------------------------------------------------------------------- noise


class _DropAccelerateNotice(logging.Filter):
    """diffusers' "`accelerate` was not found ... pip install accelerate": this package loads without it on
    purpose (loading.py streams weights itself), so the advice is noise, printed twice per local-folder load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`accelerate` was not found" not in record.getMessage()


def silence_accelerate_notice() -> None:
    for name in ("diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAccelerateNotice) for f in logger.filters):
            logger.addFilter(_DropAccelerateNotice())
