"""convrnn.max_pool2d: functional wrapper, fake kernel and autograd.

The backward op recomputes each window's argmax from the saved input, so the forward
returns indices only when the caller asks for them (return_indices=True)."""
import torch

from ._common import empty_like_input
from ._pooling import empty_pooled, pair, stride_or_kernel


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Same signature, results, indices and gradients as torch.nn.functional.max_pool2d."""
    k = pair(kernel_size)
    out, indices = torch.ops.convrnn.max_pool2d(input, k, stride_or_kernel(stride, k), pair(padding),
                                                pair(dilation), bool(ceil_mode), bool(return_indices))
    return (out, indices) if return_indices else out


@torch.library.register_fake("convrnn::max_pool2d")
def _(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    out = empty_pooled(input, kernel_size, stride, padding, dilation, ceil_mode)
    if return_indices:
        indices = empty_pooled(input, kernel_size, stride, padding, dilation, ceil_mode, dtype=torch.long)
    else:
        indices = input.new_empty((0,), dtype=torch.long)
    return out, indices


@torch.library.register_fake("convrnn::max_pool2d_backward")
def _(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode):
    return empty_like_input(input)


class MaxPool2dFunction(torch.autograd.Function):
    """The op's autograd formula; its setup_context and backward are also registered with
    the dispatcher (register_autograd), so torch.ops.convrnn.max_pool2d is differentiable
    on its own and torch.compile sees no Python-level Function."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return torch.ops.convrnn.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode, _ = inputs
        ctx.save_for_backward(input)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad_output, grad_indices):
        (input,) = ctx.saved_tensors
        grad_input = torch.ops.convrnn.max_pool2d_backward(grad_output, input, *ctx.args)
        return grad_input, None, None, None, None, None, None


torch.library.register_autograd("convrnn::max_pool2d", MaxPool2dFunction.backward,
                                setup_context=MaxPool2dFunction.setup_context)
