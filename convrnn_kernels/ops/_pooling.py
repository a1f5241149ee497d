"""Argument handling shared by the pooling wrappers and their fake kernels."""
import torch

from ._common import memory_format_of


def pair(value):
    """int or 1- or 2-sequence -> (a, b), as torch.nn.functional accepts them."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (value[0], value[0])
    return value


def stride_or_kernel(stride, kernel):
    """F.max_pool2d/avg_pool2d: stride None (or empty) means stride = kernel_size."""
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        return kernel
    return pair(stride)


def output_size(size, k, s, p, d, ceil_mode):
    """torch's pooling_output_shape (the C++ twin is pool_output_size in csrc/pooling.h)."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def empty_pooled(input, kernel_size, stride, padding, dilation, ceil_mode, dtype=None):
    """The fake kernels' output: pooled sizes, in the input's suggested memory format."""
    oh = output_size(input.shape[-2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = output_size(input.shape[-1], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    shape = (*input.shape[:-2], oh, ow)
    return torch.empty(shape, dtype=dtype or input.dtype, device=input.device, memory_format=memory_format_of(input))
