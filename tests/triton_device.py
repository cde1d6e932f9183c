"""Where the Triton launchers' tests run: compiled kernels on CUDA tensors where a GPU is, else the interpreter on
CPU tensors (conftest.py sets TRITON_INTERPRET=1 only without CUDA, so on a GPU machine a CPU tensor would reach a
compiled kernel). Tests build their inputs and references on the CPU; `on_triton_device` moves a launcher's tensor
arguments to TRITON_DEVICE and its results back."""
import torch

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
