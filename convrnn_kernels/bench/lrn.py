"""Benchmark case of local_response_norm: AlexNet's first normalisation layer (NORM1), in
NCHW and channels_last (core expands the formats)."""
from functools import partial
from typing import List

import torch
import torch.nn.functional as F

from .core import Case, Goal, batch, to_format

# AlexNet's constants (Krizhevsky et al. 2012, section 3.3): n=5, alpha=1e-4, beta=0.75 and
# k=2, not F.local_response_norm's default k=1.
NORM1 = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
SHAPE = (32, 96, 55, 55)

GOALS = (Goal(device="cpu", dtype="float32", speedup=5),)


def _image(shape, dev, dtype, fmt):
    return [to_format(torch.randn(shape, device=dev, dtype=dtype), fmt)]


def cases(quick: bool) -> List[Case]:
    import convrnn_kernels as ck  # here, so core and report load and test without the ops

    shape = (batch(SHAPE[0], quick),) + SHAPE[1:]
    return [Case(op="local_response_norm", label="AlexNet NORM1 (k=2 as in AlexNet)",
                 shape="x".join(map(str, shape)) + " size5 a1e-4 b0.75 k2",
                 params=dict(NORM1, input_shape=list(shape)),
                 make_inputs=partial(_image, shape),
                 ours=partial(ck.local_response_norm, **NORM1),
                 torch_fn=partial(F.local_response_norm, **NORM1),
                 goals=GOALS)]
