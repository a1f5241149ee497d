"""Benchmark cases of max_pool2d and avg_pool2d: the pooling layers of VGG, AlexNet and the
ResNet stem, each in NCHW and channels_last (core expands the formats)."""
from functools import partial
from typing import List

import torch
import torch.nn.functional as F

from .core import Case, Goal, batch, to_format

# (layer, N, C, H, W, kernel, stride, padding)
LAYERS = (
    ("VGG 2x2/2", 32, 64, 112, 112, 2, 2, 0),
    ("AlexNet 3x3/2 overlapping", 32, 96, 55, 55, 3, 2, 0),
    ("ResNet stem 3x3/2 pad 1", 32, 64, 112, 112, 3, 2, 1),
)

# The speed goals the project tracks (see the issue).  On CUDA, max pooling should beat torch
# and move data at >= 70% of the device-to-device copy bandwidth.
GOALS = {
    "max_pool2d": (
        Goal(device="cpu", dtype="float32", format="nchw", direction="forward", speedup=5),
        Goal(device="cpu", dtype="float32", format="nchw", direction="forward+backward", speedup=3),
        Goal(device="cpu", dtype="float32", format="channels_last", speedup=1),
        Goal(device="cuda", speedup=1, roofline_pct=70),
    ),
    "avg_pool2d": (Goal(device="cpu", dtype="float32", speedup=1),),
}


def _image(shape, dev, dtype, fmt):
    return [to_format(torch.randn(shape, device=dev, dtype=dtype), fmt)]


def _avg_pool_nchw(x, **args):
    """The correctness reference for avg_pool2d: torch on an NCHW copy.  torch's CUDA
    channels_last backward with padding > 0 returns wrong gradients (pytorch/pytorch#188344,
    fixed by #188345; still in torch 2.11); torch's channels_last kernel is still the one timed."""
    return F.avg_pool2d(x.contiguous(), **args)


def cases(quick: bool) -> List[Case]:
    import convrnn_kernels as ck  # here, so core and report load and test without the ops

    out = []
    for op, ours, ref in (("max_pool2d", ck.max_pool2d, F.max_pool2d), ("avg_pool2d", ck.avg_pool2d, F.avg_pool2d)):
        for label, n, c, h, w, k, s, p in LAYERS:
            shape = (batch(n, quick), c, h, w)
            args = dict(kernel_size=k, stride=s, padding=p)
            out.append(Case(op=op, label=label, shape="x".join(map(str, shape)) + f" k{k} s{s} p{p}",
                            params=dict(args, input_shape=list(shape)),
                            make_inputs=partial(_image, shape),
                            ours=partial(ours, **args), torch_fn=partial(ref, **args),
                            check_fn=partial(_avg_pool_nchw, **args) if op == "avg_pool2d" else None,
                            goals=GOALS[op]))
    return out
