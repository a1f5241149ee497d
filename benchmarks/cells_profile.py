"""Where a fused cell's forward time goes, ours against torch's: GPU kernel time per call (from
torch.profiler's device events), host time per call (enqueueing N calls back to back) and the
back-to-back time per call (events around N calls, no L2 flush), at the bench's cell shapes.

The bench times one call at a time after an L2 flush, so a forward whose kernels take a few
microseconds can measure the host path instead; this separates the two.  Issue 4's CUDA cell
forward misses (0.69-0.95x at B=1 in half types, session 2) are the question.

    python benchmarks/cells_profile.py [--device cuda] [--dtypes float32,float16] [-n 200]
Prints one row per (cell, shape, dtype, grad): ours and torch's gpu_us, host_us, loop_us."""
import argparse
import time

import torch

import convrnn_kernels as ck
from convrnn_kernels.bench.rnn import SHAPES, _inputs

CELLS = (("lstm_cell", ck.lstm_cell, torch.lstm_cell), ("gru_cell", ck.gru_cell, torch.gru_cell),
         ("rnn_tanh_cell", ck.rnn_tanh_cell, torch.rnn_tanh_cell))


def call(fn, lstm, args):
    x, *rest = args
    if lstm:
        h, c, *w = rest
        return fn(x, (h, c), *w)
    return fn(x, *rest)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fn, lstm, args, n, dev):
    """(gpu_us, host_us, loop_us) per call."""
    for _ in range(5):
        call(fn, lstm, args)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        call(fn, lstm, args)
    host = (time.perf_counter() - t0) / n * 1e6
    sync(dev)
    loop = float("nan")
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            call(fn, lstm, args)
        end.record()
        sync(dev)
        loop = start.elapsed_time(end) / n * 1e3
    gpu = float("nan")
    if dev.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(n):
                call(fn, lstm, args)
            sync(dev)
        total = 0.0
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                total += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        gpu = total / n
    return gpu, host, loop


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args()
    dev = torch.device(a.device)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"n {a.n}; microseconds per call")
    print(f"{'cell':14} {'shape':16} {'dtype':9} {'grad':5} | {'ours gpu':>8} {'host':>7} {'loop':>7} | "
          f"{'torch gpu':>9} {'host':>7} {'loop':>7}")
    for name, ours, ref in CELLS:
        lstm = name == "lstm_cell"
        for _, b, i, h in SHAPES:
            for dt in a.dtypes.split(","):
                dtype = getattr(torch, dt)
                args = _inputs(name, b, i, h, dev, dtype, None)
                for grad in (False, True):
                    args_g = [t.detach().requires_grad_(grad) for t in args]
                    o = measure(ours, lstm, args_g, a.n, dev)
                    t = measure(ref, lstm, args_g, a.n, dev)
                    shape = f"B{b} I{i} H{h}"
                    print(f"{name:14} {shape:16} {dt:9} {str(grad):5} | {o[0]:8.2f} {o[1]:7.2f} {o[2]:7.2f} | "
                          f"{t[0]:9.2f} {t[1]:7.2f} {t[2]:7.2f}", flush=True)


if __name__ == "__main__":
    main()
