"""Benchmark cases of the fused recurrent cells against torch's own (torch.lstm_cell,
torch.gru_cell, torch.rnn_tanh_cell): a character model's step (B=1) and two batched sizes.
The B=1 step is its own group ("<cell>@B=1") because the project's goal differs there.

Whole sequences ("lstm_seq", "gru_seq"): convrnn_kernels.nn.LSTM / GRU against torch.nn.LSTM /
GRU with identical weights, 2 layers: a training shape (T=50, B=32, I=128, H=256) and a
generation-latency shape (T=100, B=1, I=65, H=128).  The CPU goals judge forward+backward at the
training shape and the forward (inference) at each shape.
torch runs oneDNN's fused LSTM on the CPU in float32 and cuDNN on CUDA."""
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
            # the goals: 2x at B=1, 1.3x at B=64 (the large step is timed, not judged)
            goal = Goal(device="cpu", dtype="float32", direction="forward+backward", speedup=2 if b == 1 else 1.3,
                        label=None if b == 1 else "batched step")
            out.append(Case(op=group, label=label, shape=f"B{b} I{i} H{h}", params=dict(B=b, I=i, H=h),
                            make_inputs=partial(_inputs, op, b, i, h), ours=partial(_call, ours, lstm),
                            torch_fn=partial(_call, ref, lstm), grad_inputs=tuple(range(n_inputs)), formats=None,
                            goals=(goal, Goal(device="cuda", speedup=1))))
    return out + seq_cases(quick)


# ---- whole sequences ----

# (label, T, B, I, H, layers)
SEQ_SHAPES = (
    ("training", 50, 32, 128, 256, 2),
    ("generation", 100, 1, 65, 128, 2),
)
# The CPU goals: forward+backward (training) at the training shape, and forward (inference) at
# each shape.
SEQ_CPU_GOALS = (Goal(device="cpu", dtype="float32", direction="forward+backward", speedup=1, label="training"),
                 Goal(device="cpu", dtype="float32", direction="forward", min_speedup=1))


class _ModulePair:
    """Ours and torch's module with identical weights, built once per device and dtype (the
    case's inputs carry both)."""

    def __init__(self, kind, i, h, layers):
        self.kind, self.i, self.h, self.layers = kind, i, h, layers
        self.built = {}

    def get(self, like):
        key = (str(like.device), like.dtype)
        if key not in self.built:
            import convrnn_kernels as ck
            torch.manual_seed(0)
            theirs = getattr(torch.nn, self.kind)(self.i, self.h, num_layers=self.layers).to(like.device, like.dtype)
            ours = getattr(ck.nn, self.kind)(self.i, self.h, num_layers=self.layers).to(like.device, like.dtype)
            ours.load_state_dict(theirs.state_dict())
            self.built[key] = (ours, theirs)
        return self.built[key]


def _seq_inputs(lstm, t, b, i, h, layers, dev, dtype, fmt):
    mk = partial(torch.randn, device=dev, dtype=dtype)
    return [mk(t, b, i)] + [mk(layers, b, h) * 0.5 for _ in range(2 if lstm else 1)]


def _seq_call(pair, which, x, *states):
    module = pair.get(x)[which]
    hx = tuple(states) if len(states) == 2 else states[0]
    out, hn = module(x, hx)
    return (out,) + (tuple(hn) if isinstance(hn, tuple) else (hn,))


def seq_cases(quick: bool) -> List[Case]:
    out = []
    for op, kind in (("lstm_seq", "LSTM"), ("gru_seq", "GRU")):
        lstm = kind == "LSTM"
        for label, t, b, i, h, layers in SEQ_SHAPES:
            b = b if b == 1 else batch(b, quick)
            pair = _ModulePair(kind, i, h, layers)
            goals = SEQ_CPU_GOALS + (Goal(device="cuda", speedup=0.8 if b > 8 else 1, label=label),)
            out.append(Case(op=op, label=label, shape=f"T{t} B{b} I{i} H{h} L{layers}",
                            params=dict(T=t, B=b, I=i, H=h, layers=layers),
                            make_inputs=partial(_seq_inputs, lstm, t, b, i, h, layers),
                            ours=partial(_seq_call, pair, 0), torch_fn=partial(_seq_call, pair, 1),
                            grad_inputs=tuple(range(3 if lstm else 2)), formats=None, goals=goals))
    return out
