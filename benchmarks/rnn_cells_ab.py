# python benchmarks/rnn_cells_ab.py [rounds] [cells] [shapes]: the cell cases of
# convrnn_kernels/bench/rnn.py as an interleaved A/B, for a shared machine where the bench
# harness's rows drift (PYTHONPATH=<repo>).  Per round: a batch of calls of ours, then of torch
# (order alternating round by round); reports the median ms per call of each and the median of
# the per-round ratios torch/ours (robust to load drift).  Forward+backward is the bench's
# protocol: every input requires grad, .grad cleared before each call, random upstream
# gradients for every output.  cells: comma list of lstm,gru,rnn; shapes: comma list of B.
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

CELLS = {"lstm": ("lstm_cell", ck.lstm_cell, torch.lstm_cell), "gru": ("gru_cell", ck.gru_cell, torch.gru_cell),
         "rnn": ("rnn_tanh_cell", ck.rnn_tanh_cell, torch.rnn_tanh_cell)}


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
    torch.manual_seed(0)
    for key in cells:
        op, ours, theirs = CELLS[key]
        lstm = op == "lstm_cell"
        for _, b, i, h in SHAPES:
            if b not in batches:
                continue
            for backward in (False, True):
                base = _inputs(op, b, i, h, "cpu", torch.float32, None)
                inputs = [t.detach().requires_grad_(backward) for t in base]
                grads = [torch.randn(b, h) for _ in range(2 if lstm else 1)]
                o, t = runner(ours, lstm, inputs, backward, grads), runner(theirs, lstm, inputs, backward, grads)
                t0 = time.perf_counter()
                for f in (o, t, o, t):
                    f()
                n = max(1, int(0.02 / max((time.perf_counter() - t0) / 4, 1e-6)))  # ~20 ms per batch
                to, tt, r = [], [], []
                clock = time.process_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter
                quiet = os.environ.get("QUIET") == "1"
                for k in range(rounds):
                    if quiet:
                        wait_quiet()
                    pair = [(o, to), (t, tt)] if k % 2 == 0 else [(t, tt), (o, to)]
                    for f, acc in pair:
                        t0 = clock()
                        for _ in range(n):
                            f()
                        acc.append((clock() - t0) * 1e3 / n)
                    r.append(tt[-1] / to[-1])
                d = "fwd+bwd" if backward else "fwd"
                print(f"{op:14s} B{b:<4d} I{i:<5d} H{h:<5d} {d:8s} ours {statistics.median(to):8.4f} ms  "
                      f"torch {statistics.median(tt):8.4f} ms  speed-up {statistics.median(r):.2f}x "
                      f"(min-based {min(tt) / min(to):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
