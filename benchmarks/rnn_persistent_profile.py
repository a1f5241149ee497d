"""Per-step cost of the persistent recurrence's kernels at batch 1, by barrier mode.

For each cell (LSTM, GRU), mode (CONVRNN_PERSISTENT_CLUSTER 0/1/2: grid barrier, cluster,
cluster + distributed shared memory) and sequence length T in (--short, --long), runs one
layer (B=1, I=65, H=128: the generation shape's layer) forward and backward under
torch.profiler and sums the device time of each kernel by name.  The persistent kernels'
time per step is the slope (t_long - t_short) / (long - short): launch and W staging cancel.

    python benchmarks/rnn_persistent_profile.py [--dtype float32] [--short 50] [--long 250]
    python benchmarks/rnn_persistent_profile.py --once lstm   # one forward+backward (for ncu)"""
import argparse
import os
from collections import defaultdict

import torch

import convrnn_kernels as ck


def run_layer(name, t, dtype, reps=1):
    torch.manual_seed(0)
    mod = (ck.nn.LSTM if name == "lstm" else ck.nn.GRU)(65, 128).cuda().to(dtype)
    x = torch.randn(t, 1, 65, device="cuda", dtype=dtype, requires_grad=True)
    for _ in range(reps):
        out, _ = mod(x)
        out.float().square().sum().backward()
    torch.cuda.synchronize()


def kernel_times(name, t, dtype, reps):
    run_layer(name, t, dtype)  # warm-up: plans, handles, caches
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        run_layer(name, t, dtype, reps)
    by = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            key = "forward_kernel" if "forward_kernel" in ev.name else (
                "backward_kernel" if "backward_kernel" in ev.name else "other")
            by[key] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / reps
    return by


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--short", type=int, default=50)
    ap.add_argument("--long", type=int, default=250)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--once", choices=["lstm", "gru"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.once:
        run_layer(a.once, a.short, dtype)
        return
    print(f"{torch.cuda.get_device_name()}, {a.dtype}, B=1 I=65 H=128, one layer; device us per call "
          f"(forward kernel, backward kernel, other kernels) and us per step of the persistent kernels")
    for name in ("lstm", "gru"):
        for mode in ("0", "1", "2"):
            os.environ["CONVRNN_PERSISTENT_CLUSTER"] = mode
            before = torch.ops.convrnn._persistent_rnn_launches()
            s = kernel_times(name, a.short, dtype, a.reps)
            lg = kernel_times(name, a.long, dtype, a.reps)
            used = [x - y for x, y in zip(torch.ops.convrnn._persistent_rnn_launches(), before)]
            span = a.long - a.short
            print(f"{name:4} mode {mode} launches {used}: T={a.short}: fwd {s['forward_kernel']:8.1f} "
                  f"bwd {s['backward_kernel']:8.1f} other {s['other']:7.1f} | T={a.long}: fwd "
                  f"{lg['forward_kernel']:8.1f} bwd {lg['backward_kernel']:8.1f} | per step: fwd "
                  f"{(lg['forward_kernel'] - s['forward_kernel']) / span:6.2f} bwd "
                  f"{(lg['backward_kernel'] - s['backward_kernel']) / span:6.2f}", flush=True)


if __name__ == "__main__":
    main()
