"""Benchmark cases of the fused recurrent cells against torch's own (torch.lstm_cell,
torch.gru_cell, torch.rnn_tanh_cell): a character model's step (B=1) and two batched sizes.
The B=1 step is its own group ("<cell>@B=1") because the project's goal differs there."""
from functools import partial
from typing import List

import torch

from .core import Case, Goal, batch

# (label, B, I, H)
SHAPES = (
    ("char-model step", 1, 65, 128),
    ("batched step", 64, 256, 512),
    ("large step", 256, 1024, 1024),
)
GATES = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1}


def _inputs(op, b, i, h, dev, dtype, fmt):
    g = GATES[op]
    mk = partial(torch.randn, device=dev, dtype=dtype)
    k = h ** -0.5  # torch.nn's init range keeps the gates out of saturation
    states = [mk(b, h), mk(b, h)] if op == "lstm_cell" else [mk(b, h)]
    return [mk(b, i)] + states + [mk(g * h, i) * k, mk(g * h, h) * k, mk(g * h) * k, mk(g * h) * k]


def _call(fn, lstm, x, *rest):
    if lstm:
        h, c, *w = rest
        return fn(x, (h, c), *w)
    return fn(x, *rest)


def cases(quick: bool) -> List[Case]:
    import convrnn_kernels as ck

    out = []
    for op, ours, ref in (("lstm_cell", ck.lstm_cell, torch.lstm_cell), ("gru_cell", ck.gru_cell, torch.gru_cell),
                          ("rnn_tanh_cell", ck.rnn_tanh_cell, torch.rnn_tanh_cell)):
        lstm = op == "lstm_cell"
        n_inputs = 7 if lstm else 6  # x, h, (c), w_ih, w_hh, b_ih, b_hh
        for label, b, i, h in SHAPES:
            b = b if b == 1 else batch(b, quick)
            group = f"{op}@B=1" if b == 1 else op
            goal = Goal(device="cpu", dtype="float32", direction="forward+backward", speedup=2 if b == 1 else 1.3)
            out.append(Case(op=group, label=label, shape=f"B{b} I{i} H{h}", params=dict(B=b, I=i, H=h),
                            make_inputs=partial(_inputs, op, b, i, h), ours=partial(_call, ours, lstm),
                            torch_fn=partial(_call, ref, lstm), grad_inputs=tuple(range(n_inputs)), formats=None,
                            goals=(goal, Goal(device="cuda", speedup=1))))
    return out
