"""What several test modules share: the repository root, where the Triton launchers run, the relative error the
pipeline tests compare with, the C++ emulations' build and the fresh-process launcher."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where the Triton launchers' tests run: compiled kernels on CUDA tensors where a GPU is, else the interpreter on
# CPU tensors (conftest.py sets TRITON_INTERPRET=1 only without CUDA, so on a GPU machine a CPU tensor would reach a
# compiled kernel). Tests build their inputs and references on the CPU; `on_triton_device` moves a launcher's tensor
# arguments to TRITON_DEVICE and its results back.
TRITON_DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def on_triton_device(fn):
    def to_dev(a):
        return a.to(TRITON_DEVICE) if torch.is_tensor(a) else a

    def back(t):
        return t.cpu() if torch.is_tensor(t) else t

    def call(*args, **kw):
        out = fn(*[to_dev(a) for a in args], **{k: to_dev(v) for k, v in kw.items()})
        return tuple(back(t) for t in out) if isinstance(out, tuple) else back(out)

    call.__wrapped__ = fn
    return call


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp32): the pipeline tests' error of a run against its reference b."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def small_vae(attention: bool, dtype=torch.float32):
    """A small SD-layout AutoencoderKL with random weights (scale factor 2, 13 GroupNorms in the decoder)."""
    from diffusers import AutoencoderKL  # only the VAE tests need it: the other tests import this module too

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         norm_num_groups=8, latent_channels=4, mid_block_add_attention=attention).eval().to(dtype)


def structured_latents(B=2, h=48, w=56):
    """Smooth large-scale structure (so bands and tiles have different GroupNorm statistics) plus noise."""
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    field = torch.stack([xx, yy, xx * yy, torch.sin(3 * xx)])[None]
    return 0.5 * torch.randn(B, 4, h, w) + 2 * field * torch.tensor([1.0, -1.0])[:B, None, None, None]


def save_tiny_folder(path, pipeline_cls=None, **save_kw):
    """The tiny pipeline written with save_pretrained (as `pipeline_cls`, default PixArtAlphaPipeline); see
    tiny.save_pretrained_offline for why its tokenizer is relabelled (same ids: asserted below through the images)."""
    from tiled_diffusion.tiny import save_pretrained_offline
    from tiled_diffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    if pipeline_cls is not None:
        pipe = pipeline_cls(**pipe.components)
    save_pretrained_offline(pipe, path, **save_kw)
    return path


def build_emulator(tmp_path_factory, name: str, src: str, *flags: str) -> str:
    """Compile a host C++ emulation (tests/backends/*/*_emulation.cpp) with g++; skips without a host compiler."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++) to build the emulation")
    exe = str(tmp_path_factory.mktemp(name) / "emu")
    r = subprocess.run([gxx, "-O2", "-std=c++17", *flags, src, "-o", exe], capture_output=True, text=True)
    assert r.returncode == 0, f"emulation failed to compile:\n{r.stderr}"
    return exe


def run_python(*args: str, env=None, cwd=None, timeout=None, check: bool = False) -> subprocess.CompletedProcess:
    """`python <args>` in a fresh process (this interpreter), text output captured: for what must start clean
    (import-time behaviour, environment variables read once, TRITON_INTERPRET unset)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          check=check)


def compiled_env() -> dict:
    """This environment without TRITON_INTERPRET (the child compiles Triton kernels, or AOT-compiles them without a
    GPU) and with this checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def accelerated_tiny_pipeline(**accelerate_kw):
    """For a fixture to `yield from`: the built-in tiny pipeline accelerated (int8 off, plain text encoder, unless
    `accelerate_kw` says otherwise) for the fixture's lifetime, restored afterwards."""
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    P.accelerate(pipe, **{"int8": None, "text_encoder_int8": False, **accelerate_kw})
    yield pipe
    P.restore(pipe)
