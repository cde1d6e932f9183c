"""Swaps into a PixArt transformer: the canvas forward, tiled attention, canvas positions, int8 layers,
the ControlNet-Transformer and regional prompts."""
from .. import ops

# The swapped modules call the Triton-backed ops, possibly inside torch.compile: register them before any trace.
ops.register_triton_ops()
