"""Benchmark cases of conv2d against torch.nn.functional.conv2d (oneDNN on the CPU, cuDNN on
CUDA) on the seed's convolution layers, each in NCHW and channels_last.

FLOPs: forward 2*N*K*P*Q*(C/groups)*R*S; forward+backward three times that (the forward, the
input gradient and the weight gradient each do as many multiply-adds).  The benchmark's
--tf32 option (default off) sets torch.backends.cudnn.allow_tf32 and
torch.backends.cuda.matmul.allow_tf32 for both sides: our float32 CUDA kernels follow the same
flag as cuDNN."""
from functools import partial
from typing import List

import torch
import torch.nn.functional as F

from .core import Case, Goal, batch, to_format

# (layer, N, C, H, W, K, R, stride, pad, groups)
LAYERS = (
    ("LeNet-5 C1", 64, 1, 32, 32, 6, 5, 1, 0, 1),
    ("LeNet-5 C3", 64, 6, 14, 14, 16, 5, 1, 0, 1),
    ("AlexNet CONV1", 8, 3, 227, 227, 96, 11, 4, 0, 1),
    ("AlexNet CONV2", 8, 96, 27, 27, 256, 5, 1, 2, 1),
    ("VGG conv3-64", 2, 64, 224, 224, 64, 3, 1, 1, 1),
    ("ResNet 3x3", 8, 64, 56, 56, 64, 3, 1, 1, 1),
    ("GoogLeNet/ResNet 1x1", 8, 256, 28, 28, 128, 1, 1, 0, 1),
    ("7x7/2 stem", 4, 3, 224, 224, 64, 7, 2, 3, 1),
    ("depthwise 3x3", 8, 128, 56, 56, 128, 3, 1, 1, 128),
    ("CIFAR ResNet", 32, 16, 32, 32, 16, 3, 1, 1, 1),
)

GOALS = (
    Goal(device="cpu", dtype="float32", direction="forward", speedup=0.8, min_speedup=0.4),
    Goal(device="cpu", dtype="float32", direction="forward+backward", speedup=0.8, min_speedup=0.4),
    Goal(device="cuda", dtype="float32", speedup=0.7),
    Goal(device="cuda", dtype="float32", speedup=1, label="depthwise 3x3"),
    Goal(device="cuda", dtype="bfloat16", speedup=0.5),
)


def _inputs(n, c, h, w, k, r, groups, bias, dev, dtype, fmt):
    x = to_format(torch.randn(n, c, h, w, device=dev, dtype=dtype), fmt)
    weight = to_format(torch.randn(k, c // groups, r, r, device=dev, dtype=dtype) * (c // groups * r * r) ** -0.5, fmt)
    return [x, weight, torch.randn(k, device=dev, dtype=dtype)] if bias else [x, weight]


def cases(quick: bool) -> List[Case]:
    import convrnn_kernels as ck

    out = []
    for label, n, c, h, w, k, r, stride, pad, groups in LAYERS:
        n = batch(n, quick)
        p = (h + 2 * pad - r) // stride + 1
        q = (w + 2 * pad - r) // stride + 1
        fwd = 2.0 * n * k * p * q * (c // groups) * r * r
        args = dict(stride=stride, padding=pad, groups=groups)
        shape = f"{n}x{c}x{h}x{w} k{k} {r}x{r}/{stride} p{pad}" + (f" g{groups}" if groups > 1 else "")
        out.append(Case(op="conv2d", label=label, shape=shape,
                        params=dict(args, input_shape=[n, c, h, w], out_channels=k, kernel_size=r),
                        make_inputs=partial(_inputs, n, c, h, w, k, r, groups, True),
                        ours=partial(ck.conv2d, **args), torch_fn=partial(F.conv2d, **args),
                        grad_inputs=(0, 1, 2), flops={"forward": fwd, "forward+backward": 3 * fwd}, goals=GOALS))
    return out
