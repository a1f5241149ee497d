"""convrnn.local_response_norm: functional wrapper, fake kernel and autograd.

The backward recomputes the normalisation scale from the saved input rather than saving
it, so the forward keeps nothing alive but the input."""
import torch

from .. import _C
from ._common import OpFunction, call, empty_like_input

OPS = torch.ops.convrnn


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Same signature, results and gradients as torch.nn.functional.local_response_norm:
    out_c = x_c / (k + alpha/size * sum of x_j^2 over j in [c - size//2, c + (size-1)//2])^beta."""
    if isinstance(size, (bool, float)) or not hasattr(size, "__index__"):
        # torch raises TypeError for these too (a float size would otherwise be truncated)
        raise TypeError(f"convrnn.local_response_norm: size must be an integer, but got {type(size).__name__} {size!r}")
    return call(OPS.local_response_norm.default, input, int(size), float(alpha), float(beta), float(k))


@torch.library.register_fake("convrnn::local_response_norm")
def _(input, size, alpha, beta, k):
    return empty_like_input(input)


@torch.library.register_fake("convrnn::local_response_norm_backward")
def _(grad_output, input, size, alpha, beta, k):
    return empty_like_input(input)


class LocalResponseNormFunction(OpFunction):
    """The op's autograd formula, registered with the dispatcher (see MaxPool2dFunction)."""
    op_name = "local_response_norm"
    eager = _C.local_response_norm_autograd  # its C++ twin (csrc/image_ops_autograd.cpp)

    @staticmethod
    def save(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.args = tuple(inputs[1:])

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = torch.ops.convrnn.local_response_norm_backward(grad_output, input, *ctx.args)
        return grad_input, None, None, None, None

