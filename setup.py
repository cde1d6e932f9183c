"""Builds tiled_diffusion._C.

CPU kernels are always built. CUDA kernels are built whenever torch is a CUDA build and nvcc is found
(no GPU is needed to compile). Knobs (environment variables):
  TD_CUDA_ARCHS  semicolon list of compute capabilities, default "8.0;9.0" (PTX is embedded for the newest)
  TD_SKIP_CUDA=1 build the CPU kernels only
  MAX_JOBS       parallel compile jobs (ninja), read by torch.utils.cpp_extension
Rebuilds are incremental: ninja keeps its state in build/ (keep that folder between builds).
"""
import glob
import os
import shutil
import sysconfig

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvidia_wheel_dirs():
    """include/ and lib/ folders of the nvidia-* wheels (cusparse.h, cublas_v2.h live there, not in the toolkit)."""
    inc, lib = [], []
    site = sysconfig.get_paths()["purelib"]
    for root in sorted(glob.glob(os.path.join(site, "nvidia", "*"))):
        if os.path.isdir(os.path.join(root, "include")):
            inc.append(os.path.join(root, "include"))
        if os.path.isdir(os.path.join(root, "lib")):
            lib.append(os.path.join(root, "lib"))
    return inc, lib


def _find_cuda_home():
    """The toolkit root holding bin/nvcc and include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates += [os.path.dirname(os.path.dirname(real)), os.path.dirname(os.path.dirname(nvcc))]
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and (
            os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))
            or glob.glob(os.path.join(c, "targets", "*", "include", "cuda_runtime.h"))
        ):
            return c
    return None


def _gencode_flags(archs):
    flags = []
    for a in archs:
        cc = a.replace(".", "")
        flags += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    newest = archs[-1].replace(".", "")
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def build_extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    define_macros = []

    want_cuda = os.environ.get("TD_SKIP_CUDA", "0") != "1" and torch.version.cuda is not None
    cuda_home = _find_cuda_home() if want_cuda else None
    if want_cuda and cuda_home is None:
        print("tiled_diffusion: nvcc not found; building the CPU kernels only (set CUDA_HOME to build CUDA)")
    if cuda_home and cuda_sources:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch guesses it at import time and may guess wrong
        archs = [a.strip() for a in os.environ.get("TD_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]
        inc, lib = _nvidia_wheel_dirs()
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas=-v"] + _gencode_flags(archs)
        # torch's cpp_extension adds its own -gencode from TORCH_CUDA_ARCH_LIST; pin that to ours too.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        return [
            cpp_extension.CUDAExtension(
                "tiled_diffusion._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(HERE, "csrc")] + inc,
                library_dirs=lib,
                define_macros=define_macros + [("TD_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "tiled_diffusion._C",
            cpu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=build_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
