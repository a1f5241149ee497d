"""convrnn.max_pool2d: functional wrapper, fake kernel and autograd.

When autograd will need it, the forward also returns each window's argmax as a tap number
(uint8 for windows of fewer than 255 taps, else int32: csrc/max_pool2d.h), and the backward
reads that instead of the input.  torch's int64 indices are computed only when the caller
asks for them (return_indices=True)."""
import torch

from .. import _C
from ._common import OpFunction, call, empty_like_input
from ._pooling import empty_pooled, pair, stride_or_kernel

OPS = torch.ops.convrnn


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Same signature, results, indices and gradients as torch.nn.functional.max_pool2d."""
    k = pair(kernel_size)
    save_argmax = torch.is_grad_enabled() and isinstance(input, torch.Tensor) and input.requires_grad
    out, indices, _ = call(OPS.max_pool2d.default, input, k, stride_or_kernel(stride, k), pair(padding), pair(dilation),
                           bool(ceil_mode), bool(return_indices), save_argmax)
    return (out, indices) if return_indices else out


def argmax_dtype(kernel_size):
    return torch.uint8 if kernel_size[0] * kernel_size[1] < 255 else torch.int32


@torch.library.register_fake("convrnn::max_pool2d")
def _(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, save_argmax):
    def pooled(dtype, wanted):
        if wanted:
            return empty_pooled(input, kernel_size, stride, padding, dilation, ceil_mode, dtype=dtype)
        return input.new_empty((0,), dtype=dtype)

    return (pooled(input.dtype, True), pooled(torch.long, return_indices),
            pooled(argmax_dtype(kernel_size), save_argmax))


@torch.library.register_fake("convrnn::max_pool2d_backward")
def _(grad_output, input, argmax, kernel_size, stride, padding, dilation, ceil_mode):
    return empty_like_input(input)


class MaxPool2dFunction(OpFunction):
    """The op's autograd formula, also registered with the dispatcher (OpFunction), so
    torch.ops.convrnn.max_pool2d is differentiable on its own and torch.compile sees no
    Python-level Function; eager calls apply its C++ twin (_common.call)."""
    op_name = "max_pool2d"
    eager = _C.max_pool2d_autograd  # its C++ twin (csrc/image_ops_autograd.cpp)

    @staticmethod
    def save(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode, _, _ = inputs
        ctx.save_for_backward(input, output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad_output, grad_indices, grad_argmax):
        input, argmax = ctx.saved_tensors
        grad_input = torch.ops.convrnn.max_pool2d_backward(grad_output, input, argmax, *ctx.args)
        return grad_input, None, None, None, None, None, None, None

