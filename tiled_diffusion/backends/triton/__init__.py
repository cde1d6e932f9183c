"""Triton kernels and their launchers (GPU; the tests run them under TRITON_INTERPRET=1 on CPU tensors)."""
