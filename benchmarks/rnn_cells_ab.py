# python benchmarks/rnn_cells_ab.py [rounds] [cells] [shapes]: the cell cases of
# convrnn_kernels/bench/rnn.py as an interleaved A/B, for a shared machine where the bench
# harness's rows drift (PYTHONPATH=<repo>).  Per round: a batch of calls of each contender
# (order rotating round by round); reports the median ms per call of each and the median of
# the per-round speed-ups torch/contender (robust to load drift).  Forward+backward is the bench's
# protocol: every input requires grad, .grad cleared before each call, random upstream
# gradients for every output.  cells: comma list of lstm,gru,rnn; shapes: comma list of B.
# OLD=1 adds a third contender, "before": the cells as they were before the whole-cell ops
# (main at 41a7f8f: Python checks, two F.linear, the fused pointwise op with Python autograd),
# rebuilt below on the fused ops, which are still registered; speed-ups are against torch.
# MKL=1 adds a contender "mkl": ours with the float products through MKL (convrnn::_cpu_gemm(0))
# instead of our panel kernel (cpu/panel_gemm.h).
# THREADS=n sets torch's intra-op threads (default: torch's default, 2 on the project machine).
# CLOCK=cpu times with the process's CPU time instead of the wall clock: with THREADS=1 on a
# loaded machine it leaves out the time the process waits for a core.  QUIET=1 starts each
# round only when no other task is runnable (procs_running in /proc/stat, polled for up to 60 s):
# on a shared machine whose load comes in bursts, rounds then fall in the quiet gaps.
import os
import statistics
import sys
import time

import torch

import convrnn_kernels as ck
from convrnn_kernels.bench.rnn import SHAPES, _inputs

# ---- the cells before the whole-cell ops (convrnn_kernels/ops/rnn_cells.py at 41a7f8f) ----
import torch.nn.functional as F  # noqa: E402

OPS = torch.ops.convrnn


def _check(op, input, states, w_ih, w_hh, b_ih, b_hh, gates):
    """Validates the arguments of a cell as torch.nn.*Cell would, with messages naming the op
    and the argument; returns whether the input is batched."""
    def fail(msg):
        raise RuntimeError(f"convrnn.{op}: {msg}")

    for name, t in [("input", input), ("w_ih", w_ih), ("w_hh", w_hh)] + list(states.items()) + \
            [(n, b) for n, b in (("b_ih", b_ih), ("b_hh", b_hh)) if b is not None]:
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, but got {type(t).__name__}")
        if t.dtype != input.dtype:
            raise TypeError(f"convrnn.{op}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "expected one dtype")
        if t.device != input.device:
            fail(f"{name} is on {t.device} but input is on {input.device}; expected all tensors on one device")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"convrnn.{op}: input must be float32, float64, float16 or bfloat16, but got {input.dtype}")
    if input.dim() not in (1, 2):
        fail(f"input must be 1-D (input_size) or 2-D (batch, input_size), but got shape {tuple(input.shape)}")
    if w_hh.dim() != 2 or w_ih.dim() != 2:
        fail(f"w_ih and w_hh must be 2-D, but got shapes {tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if w_hh.shape[0] != gates * hidden:
        fail(f"w_hh must have {gates} * hidden_size = {gates * hidden} rows, but got shape {tuple(w_hh.shape)}")
    if w_ih.shape[0] != gates * hidden:
        fail(f"w_ih must have {gates} * hidden_size = {gates * hidden} rows, but got shape {tuple(w_ih.shape)}")
    if input.shape[-1] != w_ih.shape[1]:
        fail(f"input has {input.shape[-1]} features but w_ih expects input_size = {w_ih.shape[1]}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * hidden,):
            fail(f"{name} must have shape ({gates * hidden},), but got {tuple(b.shape)}")
    expected = (input.shape[0], hidden) if input.dim() == 2 else (hidden,)
    for name, t in states.items():
        if tuple(t.shape) != expected:
            fail(f"{name} must have shape {expected} (batch and hidden_size of the input and weights), "
                 f"but got {tuple(t.shape)}")
    if (b_ih is None) != (b_hh is None):
        fail("b_ih and b_hh must be given together")
    return input.dim() == 2


def _batched(t, batched):
    return t if batched else t.unsqueeze(0)


def _unbatched(t, batched):
    return t if batched else t.squeeze(0)


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') = LSTM cell step, as torch.lstm_cell / torch.nn.LSTMCell."""
    h, c = hx
    batched = _check("lstm_cell", input, {"h": h, "c": c}, w_ih, w_hh, b_ih, b_hh, 4)
    x, h, c = (_batched(t, batched) for t in (input, h, c))
    hy, cy, _ = OPS.lstm_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), c, b_ih, b_hh)
    return _unbatched(hy, batched), _unbatched(cy, batched)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = GRU cell step, as torch.gru_cell / torch.nn.GRUCell."""
    batched = _check("gru_cell", input, {"hx": hx}, w_ih, w_hh, b_ih, b_hh, 3)
    x, h = _batched(input, batched), _batched(hx, batched)
    hy, _ = OPS.gru_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), h, b_ih, b_hh)
    return _unbatched(hy, batched)


def _rnn_cell(op, relu, input, hx, w_ih, w_hh, b_ih, b_hh):
    batched = _check(op, input, {"hx": hx}, w_ih, w_hh, b_ih, b_hh, 1)
    x, h = _batched(input, batched), _batched(hx, batched)
    return _unbatched(OPS.rnn_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), b_ih, b_hh, relu), batched)


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.rnn_tanh_cell."""
    return _rnn_cell("rnn_tanh_cell", False, input, hx, w_ih, w_hh, b_ih, b_hh)


OLD = {"lstm_cell": lstm_cell, "gru_cell": gru_cell, "rnn_tanh_cell": rnn_tanh_cell}

CELLS = {"lstm": ("lstm_cell", ck.lstm_cell, torch.lstm_cell), "gru": ("gru_cell", ck.gru_cell, torch.gru_cell),
         "rnn": ("rnn_tanh_cell", ck.rnn_tanh_cell, torch.rnn_tanh_cell)}


def with_mkl(fn):
    """fn with the float products through MKL (the panel kernel switched off during the call)."""
    def f(*args):
        before, _ = OPS._cpu_gemm(0)
        try:
            return fn(*args)
        finally:
            OPS._cpu_gemm(before)
    return f


def procs_running():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def wait_quiet(limit=60.0):
    """Until this process is the only runnable one (itself counted once), or `limit` seconds."""
    t0 = time.time()
    while procs_running() > 1 and time.time() - t0 < limit:
        time.sleep(0.05)


def runner(fn, lstm, inputs, backward, grads):
    x, *rest = inputs
    if lstm:
        h, c, *w = rest
        args = (x, (h, c), *w)
    else:
        args = (x, *rest)

    if not backward:
        def f():
            with torch.no_grad():
                fn(*args)
        return f

    def f():
        for t in inputs:
            t.grad = None
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, grads)
    return f


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    cells = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CELLS)
    batches = [int(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3 else [s[1] for s in SHAPES]
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))
    clock = time.process_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter
    quiet = os.environ.get("QUIET") == "1"
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, clock {'cpu' if clock is time.process_time else 'wall'}, "
          f"quiet gaps {quiet}, load before {os.getloadavg()[0]:.1f}", flush=True)
    for key in cells:
        op, ours, theirs = CELLS[key]
        lstm = op == "lstm_cell"
        names = ["ours", "torch"] + (["before"] if os.environ.get("OLD") == "1" else []) + \
            (["mkl"] if os.environ.get("MKL") == "1" else [])
        fns = {"ours": ours, "torch": theirs, "before": OLD[op], "mkl": with_mkl(ours)}
        for _, b, i, h in SHAPES:
            if b not in batches:
                continue
            for backward in (False, True):
                base = _inputs(op, b, i, h, "cpu", torch.float32, None)
                inputs = [t.detach().requires_grad_(backward) for t in base]
                grads = [torch.randn(b, h) for _ in range(2 if lstm else 1)]
                calls = {n: runner(fns[n], lstm, inputs, backward, grads) for n in names}
                for f in list(calls.values()) * 3:  # warm-up (a first backward takes ~80 ms)
                    f()
                t0 = time.perf_counter()
                for f in list(calls.values()) * 3:
                    f()
                per_call = (time.perf_counter() - t0) / (3 * len(calls))
                n = max(1, int(0.02 / max(per_call, 1e-6)))  # ~20 ms per batch
                times = {name: [] for name in names}
                for k in range(rounds):
                    if quiet:
                        wait_quiet()
                    order = names[k % len(names):] + names[:k % len(names)]
                    for name in order:
                        f = calls[name]
                        t0 = clock()
                        for _ in range(n):
                            f()
                        times[name].append((clock() - t0) * 1e3 / n)
                d = "fwd+bwd" if backward else "fwd"
                line = f"{op:14s} B{b:<4d} I{i:<5d} H{h:<5d} {d:8s}"
                for name in names:
                    line += f" {name} {statistics.median(times[name]):8.4f} ms"
                for name in [n for n in names if n != "torch"]:
                    r = statistics.median(t / o for t, o in zip(times["torch"], times[name]))
                    line += f" | {name} x{r:.2f} (min-based x{min(times['torch']) / min(times[name]):.2f})"
                print(line, flush=True)


if __name__ == "__main__":
    main()
