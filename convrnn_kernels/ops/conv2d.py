"""convrnn.conv2d: functional wrapper, fake kernels and autograd.

The dispatcher op takes 4-D input and numeric padding.  This wrapper adds what
torch.nn.functional.conv2d accepts on top: int or tuple arguments, unbatched (C, H, W) input,
and padding='valid' / 'same' (for an even dilated kernel extent, 'same' needs one more row or
column of zeros at the bottom/right than at the top/left, as torch pads it: that extra
row/column is an explicit zero pad before the op).  The backward op computes only the
gradients the autograd graph needs (output_mask)."""
import torch
import torch.nn.functional as F

from .. import _C
from ._common import OpFunction, call, memory_format_of

_PADDING_STRINGS = ("valid", "same")

OPS = torch.ops.convrnn


def _pair(name, value):
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"convrnn.conv2d: {name} must be an int or a pair of ints, but got {value}")
    return value


def _string_padding(padding, weight, stride, dilation):
    """Numeric (top, left) padding and the extra (left, right, top, bottom) zero pad of a
    padding string, as torch's conv2d computes them."""
    if padding not in _PADDING_STRINGS:
        raise ValueError(f"convrnn.conv2d: padding must be 'valid', 'same' or numbers, but got '{padding}'")
    if padding == "valid":
        return (0, 0), None
    if stride != (1, 1):
        raise RuntimeError(f"convrnn.conv2d: padding='same' is not supported for strided convolutions "
                           f"(stride={stride})")
    if weight.dim() != 4:
        raise RuntimeError(f"convrnn.conv2d: weight must be a 4-D (out_channels, in_channels/groups, kH, kW) "
                           f"tensor, but got shape {tuple(weight.shape)}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    pad = tuple(t // 2 for t in totals)
    extra = [t - 2 * p for t, p in zip(totals, pad)]
    return pad, ((0, extra[1], 0, extra[0]) if any(extra) else None)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Same signature, results and gradients as torch.nn.functional.conv2d."""
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"convrnn.conv2d: input must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, but got "
                           f"shape {tuple(input.shape)}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        padding, extra = _string_padding(padding, weight, stride, dilation)
        if extra is not None:
            input = F.pad(input, extra)
    else:
        padding = _pair("padding", padding)
    out = call(OPS.conv2d.default, input, weight, bias, stride, padding, dilation, int(groups))
    return out.squeeze(0) if unbatched else out


def _output_format(input, weight):
    """channels_last when input or weight suggests it (torch's oneDNN and cuDNN rule)."""
    if memory_format_of(input) == torch.channels_last or memory_format_of(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("convrnn::conv2d")
def _(input, weight, bias, stride, padding, dilation, groups):
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    shape = (n, k, _out_size(h, r, stride[0], padding[0], dilation[0]),
             _out_size(w, s, stride[1], padding[1], dilation[1]))
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input, weight))


@torch.library.register_fake("convrnn::conv2d_backward")
def _(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    def placeholder():
        return input.new_empty((0,))
    gi = (torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=_output_format(input, weight)) if output_mask[0] else placeholder())
    gw = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, memory_format=memory_format_of(weight))
          if output_mask[1] else placeholder())
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else placeholder()
    return gi, gw, gb


class Conv2dFunction(OpFunction):
    """The op's autograd formula, registered with the dispatcher (see MaxPool2dFunction):
    saves input and weight; the backward asks conv2d_backward for the needed gradients only.
    Eager calls apply its C++ twin (csrc/image_ops_autograd.cpp): a small layer's step on a GPU
    is timed as host work, where this Python node cost more than torch's C++ one."""
    op_name = "conv2d"
    eager = _C.conv2d_autograd

    @staticmethod
    def save(ctx, inputs, output):
        input, weight, bias = inputs[:3]
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.args = tuple(inputs[3:])

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bool(ctx.has_bias and ctx.needs_input_grad[2])]
        gi, gw, gb = torch.ops.convrnn.conv2d_backward(grad_output, input, weight, *ctx.args, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None)

