"""Helpers shared by the fake kernels of every op."""
import torch
from torch._prims_common import suggest_memory_format


def memory_format_of(input):
    """The memory format the C++ kernels give their outputs: the input's suggested one for
    4-D images (as torch's own kernels do), contiguous otherwise."""
    return suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format


def empty_like_input(input):
    """A fake gradient (or same-shaped output) for `input`."""
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format_of(input))
