"""Pure-PyTorch references for the pooling and normalisation ops, written from the definitions.

They never call the torch op they stand in for (no F.max_pool2d, F.avg_pool2d,
F.local_response_norm, avg_pool3d, F.conv2d): windows are built from explicit tap indices (max pool),
pad + unfold (avg pool) or a loop over channel offsets (LRN), so a bug shared by torch and a
kernel does not hide.  The tests and the benchmark's correctness pass compare against them.

Semantics follow torch.nn.functional exactly (output sizes incl. ceil_mode, max-pool indices,
NaN handling, average divisors).  All functions are differentiable through autograd.

Precision: max_pool2d selects and gathers in the input dtype, so values are exact.
avg_pool2d and local_response_norm accumulate in float64 and round once to the input dtype
(half-precision results are therefore at least as accurate as any kernel can be).
Outputs are contiguous (NCHW) whatever the input's memory format.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["pool_output_size", "max_pool2d", "avg_pool2d", "local_response_norm", "conv2d"]

IntOrPair = Union[int, Sequence[int]]


def pool_output_size(in_size: int, kernel: int, stride: int, pad: int, dilation: int,
                     ceil_mode: bool) -> int:
    """Output length of one pooled dimension, as torch computes it:
    floor-or-ceil((in + 2p - d(k-1) - 1) / s) + 1; in ceil mode the last window must start
    inside the input or its left padding, else it is dropped."""
    num = in_size + 2 * pad - dilation * (kernel - 1) - 1
    out = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= in_size + pad:
        out -= 1
    return out


def _pair(op: str, name: str, value: Optional[IntOrPair], default: Optional[Tuple[int, int]] = None
          ) -> Tuple[int, int]:
    """int -> (v, v); 1- or 2-sequence -> pair; None or () -> default (stride = kernel)."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
        if default is None:
            raise ValueError(f"reference.{op}: {name} must be given")
        return default
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"reference.{op}: {name} must be an int or a pair, but got {value}")
    return value


def _pool_args(op, input, kernel_size, stride, padding, dilation, ceil_mode, max_pad_half_eff):
    if input.dim() not in (3, 4):
        raise ValueError(f"reference.{op}: input must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, "
                         f"but got {input.dim()}-D")
    k = _pair(op, "kernel_size", kernel_size)
    s = _pair(op, "stride", stride, default=k)
    p = _pair(op, "padding", padding)
    d = _pair(op, "dilation", dilation)
    for name, v in (("kernel_size", k), ("stride", s), ("dilation", d)):
        if min(v) <= 0:
            raise ValueError(f"reference.{op}: {name} must be greater than zero, but got {v}")
    if min(p) < 0:
        raise ValueError(f"reference.{op}: padding must be non-negative, but got {p}")
    for i in range(2):
        bound = ((k[i] - 1) * d[i] + 1) // 2 if max_pad_half_eff else k[i] // 2
        if p[i] > bound:
            raise ValueError(f"reference.{op}: padding must be at most half of the kernel, "
                             f"but got padding={p}, kernel_size={k}, dilation={d}")
    H, W = input.shape[-2:]
    oh = pool_output_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    ow = pool_output_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"reference.{op}: input of size {H}x{W} is too small for kernel_size={k}, "
                         f"stride={s}, padding={p}, dilation={d} (output {oh}x{ow})")
    return k, s, p, d, oh, ow


def _taps(out: int, in_size: int, k: int, s: int, p: int, d: int, device) -> torch.Tensor:
    """(out, k) input coordinates of every tap: row o holds o*s - p + t*d for t in [0, k)."""
    o = torch.arange(out, device=device).unsqueeze(1)
    t = torch.arange(k, device=device).unsqueeze(0)
    return o * s - p + t * d


def _first_in_image(out: int, k: int, s: int, p: int, d: int, device) -> torch.Tensor:
    """torch's default argmax coordinate: the window start stepped by d until it is >= 0
    (it may lie past the image when no tap of the window is inside it)."""
    start = torch.arange(out, device=device) * s - p
    steps = torch.clamp(-start, min=0)
    return start + (steps + d - 1) // d * d


def max_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Max over the in-image taps of each window (padding never wins).  The index is h*W + w
    in the plane: the first maximum in row-major window order; a NaN always wins and the last
    NaN is taken; a window of all -inf gives -inf at its first in-image tap."""
    k, s, p, d, OH, OW = _pool_args("max_pool2d", input, kernel_size, stride, padding, dilation,
                                    ceil_mode, max_pad_half_eff=True)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    N, C, H, W = x.shape
    dev = x.device
    K = k[0] * k[1]

    ih = _taps(OH, H, k[0], s[0], p[0], d[0], dev)          # (OH, kh)
    iw = _taps(OW, W, k[1], s[1], p[1], d[1], dev)          # (OW, kw)
    # (OH, OW, kh, kw) -> (OH*OW, K): flat index and in-image mask of every tap
    flat = (ih[:, None, :, None] * W + iw[None, :, None, :]).reshape(OH * OW, K)
    valid = ((ih >= 0) & (ih < H))[:, None, :, None] & ((iw >= 0) & (iw < W))[None, :, None, :]
    valid = valid.reshape(OH * OW, K)

    planes = x.reshape(N, C, H * W)
    safe = torch.where(valid, flat, torch.zeros_like(flat)).reshape(1, 1, -1).expand(N, C, -1)
    vals = planes.detach().gather(2, safe).reshape(N, C, OH * OW, K)

    pos = torch.arange(K, device=dev)
    nan = vals.isnan() & valid
    last_nan = torch.where(nan, pos, -1).amax(-1)
    best = torch.where(valid & ~nan, vals, torch.full_like(vals, -math.inf)).amax(-1)
    is_best = valid & (vals == best.unsqueeze(-1))
    first_best = torch.where(is_best, pos, K).amin(-1)
    tap = torch.where(last_nan >= 0, last_nan, first_best)           # K where no tap is in the image

    default = (_first_in_image(OH, k[0], s[0], p[0], d[0], dev)[:, None] * W
               + _first_in_image(OW, k[1], s[1], p[1], d[1], dev)[None, :]).reshape(-1)
    has_tap = tap < K
    flat_pad = torch.cat([flat, default.unsqueeze(1)], dim=1)        # tap K -> torch's default
    index = flat_pad.unsqueeze(0).unsqueeze(0).expand(N, C, -1, -1).gather(3, tap.unsqueeze(-1)).squeeze(-1)

    picked = planes.gather(2, torch.where(has_tap, index, torch.zeros_like(index)))
    out = torch.where(has_tap, picked, torch.full_like(picked, -math.inf))
    out = out.reshape(N, C, OH, OW)
    index = index.reshape(N, C, OH, OW)
    if unbatched:
        out, index = out.squeeze(0), index.squeeze(0)
    return (out, index) if return_indices else out


def _avg_divisors(out: int, in_size: int, k: int, s: int, p: int, include_pad: bool) -> torch.Tensor:
    """Per-position tap count along one dimension, as torch: the window end is clipped at
    in + pad; count_include_pad counts from the (padded) start, else only inside the input."""
    start = torch.arange(out, dtype=torch.int64) * s - p
    end = torch.clamp(start + k, max=in_size + p)
    if include_pad:
        return end - start
    return torch.clamp(end, max=in_size) - torch.clamp(start, min=0)


def avg_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """Sum of the in-image taps of each window (zero padding) over the torch divisor."""
    if divisor_override is not None and divisor_override == 0:
        raise ValueError("reference.avg_pool2d: divisor_override must be non-zero")
    k, s, p, _, OH, OW = _pool_args("avg_pool2d", input, kernel_size, stride, padding, 1,
                                    ceil_mode, max_pad_half_eff=False)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    H, W = x.shape[-2:]
    # zero-pad p on the left, and on the right as far as the last window reaches (ceil mode)
    right_h = max(0, (OH - 1) * s[0] + k[0] - p[0] - H)
    right_w = max(0, (OW - 1) * s[1] + k[1] - p[1] - W)
    xp = torch.nn.functional.pad(x.to(torch.float64), (p[1], right_w, p[0], right_h))
    windows = xp.unfold(2, k[0], s[0]).unfold(3, k[1], s[1])[:, :, :OH, :OW]  # (N, C, OH, OW, kh, kw)
    total = windows.sum(dim=(-2, -1))
    if divisor_override is not None:
        div = torch.full((OH, OW), float(divisor_override), dtype=torch.float64)
    else:
        div = (_avg_divisors(OH, H, k[0], s[0], p[0], count_include_pad)[:, None]
               * _avg_divisors(OW, W, k[1], s[1], p[1], count_include_pad)[None, :]).to(torch.float64)
    out = (total / div.to(total.device)).to(input.dtype)
    return out.squeeze(0) if unbatched else out


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """out_c = x_c / (k + alpha/size * sum_{c'=c-size//2}^{c+(size-1)//2} x_{c'}^2) ** beta over
    dim 1 of an (N, C, *) input, channels outside [0, C) counting as zero."""
    if input.dim() < 3:
        raise ValueError(f"reference.local_response_norm: input must have at least 3 dimensions, "
                         f"but got {input.dim()}-D")
    if size <= 0:
        raise ValueError(f"reference.local_response_norm: size must be greater than zero, but got {size}")
    x = input.to(torch.float64)
    C = x.shape[1]
    sq = x * x
    pad_shape = list(sq.shape)
    before, after = size // 2, (size - 1) // 2
    pad_shape[1] = before
    parts = [sq.new_zeros(pad_shape), sq]
    pad_shape[1] = after
    parts.append(sq.new_zeros(pad_shape))
    padded = torch.cat(parts, dim=1)
    acc = torch.zeros_like(sq)
    for t in range(size):               # channel c sees padded[c + t] = sq[c - before + t]
        acc = acc + padded.narrow(1, t, C)
    out = x / (k + alpha / size * acc) ** beta
    return out.to(input.dtype)


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
           groups: int = 1) -> torch.Tensor:
    """out[n, k, p, q] = bias[k] + sum over c in k's group, r, s of
    weight[k, c, r, s] * x[n, g*Cg + c, p*sh - ph + r*dh, q*sw - pw + s*dw] (zero outside the
    image), as a sum over the R x S taps of strided slices of the zero-padded input, each
    contracted with one tap of the weight (einsum); accumulates in float64.  padding may be
    'valid' or 'same' (stride 1; the odd extra zero goes to the bottom/right, as torch's)."""
    op = "conv2d"
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"reference.{op}: input must be 3-D or 4-D and weight 4-D")
    sh, sw = _pair(op, "stride", stride)
    dh, dw = _pair(op, "dilation", dilation)
    K, Cg, R, S = weight.shape
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            th, tw = dh * (R - 1), dw * (S - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            raise ValueError(f"reference.{op}: unknown padding {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding)
        pads = (pw, pw, ph, ph)
    N, C, H, W = input.shape
    if C != Cg * groups or K % groups:
        raise ValueError(f"reference.{op}: channels do not match weight and groups")
    x = torch.nn.functional.pad(input.to(torch.float64), pads)
    w = weight.to(torch.float64)
    Hp, Wp = x.shape[2], x.shape[3]
    P, Q = (Hp - dh * (R - 1) - 1) // sh + 1, (Wp - dw * (S - 1) - 1) // sw + 1
    xg = x.reshape(N, groups, Cg, Hp, Wp)
    wg = w.reshape(groups, K // groups, Cg, R, S)
    out = x.new_zeros(N, groups, K // groups, P, Q)
    for r in range(R):
        for s_ in range(S):
            patch = xg[:, :, :, r * dh: r * dh + sh * (P - 1) + 1: sh, s_ * dw: s_ * dw + sw * (Q - 1) + 1: sw]
            out = out + torch.einsum("ngcpq,gkc->ngkpq", patch, wg[:, :, :, r, s_])
    out = out.reshape(N, K, P, Q)
    if bias is not None:
        out = out + bias.to(torch.float64).view(1, K, 1, 1)
    out = out.to(input.dtype)
    return out.squeeze(0) if unbatched else out
