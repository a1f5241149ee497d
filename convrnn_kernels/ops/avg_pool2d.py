"""convrnn.avg_pool2d: functional wrapper, fake kernel and autograd."""
import torch

from .. import _C
from ._common import OpFunction, call, empty_like_input
from ._pooling import empty_pooled, pair, stride_or_kernel

OPS = torch.ops.convrnn


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Same signature, results and gradients as torch.nn.functional.avg_pool2d."""
    k = pair(kernel_size)
    return call(OPS.avg_pool2d.default, input, k, stride_or_kernel(stride, k), pair(padding), bool(ceil_mode),
                bool(count_include_pad), divisor_override)


@torch.library.register_fake("convrnn::avg_pool2d")
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return empty_pooled(input, kernel_size, stride, padding, (1, 1), ceil_mode)


@torch.library.register_fake("convrnn::avg_pool2d_backward")
def _(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return empty_like_input(input)


class AvgPool2dFunction(OpFunction):
    """The op's autograd formula, registered with the dispatcher (see MaxPool2dFunction)."""
    op_name = "avg_pool2d"
    eager = _C.avg_pool2d_autograd  # its C++ twin (csrc/image_ops_autograd.cpp)

    @staticmethod
    def save(ctx, inputs, output):
        input = inputs[0]
        ctx.save_for_backward(input)
        ctx.args = tuple(inputs[1:])

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = torch.ops.convrnn.avg_pool2d_backward(grad_output, input, *ctx.args)
        return (grad_input,) + (None,) * len(ctx.args)

