"""Per-step cost of the persistent recurrence's kernels at batch 1, by barrier mode.

For each cell (LSTM, GRU), mode (CONVRNN_PERSISTENT_CLUSTER 0/1/2: grid barrier, cluster,
cluster + distributed shared memory) and sequence length T in (--short, --long), runs one
layer (B=1, I=65, H=128: the generation shape's layer) forward and backward under
torch.profiler and sums the device time of each kernel by name.  The persistent kernels'
time per step is the slope (t_long - t_short) / (long - short): launch and W staging cancel.

    python benchmarks/rnn_persistent_profile.py [--dtype float32] [--short 50] [--long 250]
    python benchmarks/rnn_persistent_profile.py --once lstm   # one forward+backward (for ncu)
    python benchmarks/rnn_persistent_profile.py --stack-only  # two layers' inference, stacked vs layered"""
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


def run_stack(name, t, dtype, reps=1):
    """Inference of the generation shape's two layers (the stacked kernel where it is on)."""
    torch.manual_seed(0)
    mod = (ck.nn.LSTM if name == "lstm" else ck.nn.GRU)(65, 128, num_layers=2).cuda().to(dtype)
    x = torch.randn(t, 1, 65, device="cuda", dtype=dtype)
    with torch.no_grad():
        for _ in range(reps):
            mod(x)
    torch.cuda.synchronize()


def kernel_times(name, t, dtype, reps, run=run_layer):
    run(name, t, dtype)  # warm-up: plans, handles, caches
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        run(name, t, dtype, reps)
    by = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            key = next((k for k in ("stack_forward_kernel", "forward_kernel", "backward_kernel") if k in ev.name),
                       "other")
            by[key] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / reps
    return by


def stack_steps(names, a, dtype):
    """The stacked kernel (one launch, T + 1 wavefront steps) against the layer-by-layer forward
    (two launches of T steps and the second layer's input GEMM), two layers, under no_grad."""
    print("two layers, inference (no_grad), B=1 I=65 H=128: device us per call and per time step")
    for name in names:
        for on in (1, 0):
            before, _ = torch.ops.convrnn._persistent_rnn_stack(on)
            _, n0 = torch.ops.convrnn._persistent_rnn_stack(-1)
            s = kernel_times(name, a.short, dtype, a.reps, run_stack)
            lg = kernel_times(name, a.long, dtype, a.reps, run_stack)
            _, n1 = torch.ops.convrnn._persistent_rnn_stack(before)
            span = a.long - a.short
            total = lambda d: sum(d.values())  # noqa: E731
            print(f"{name:4} {'stacked' if on else 'layered'} (stack launches {n1 - n0}): T={a.short}: "
                  f"all kernels {total(s):8.1f} (other {s['other']:6.1f}) | T={a.long}: {total(lg):8.1f} | "
                  f"per step {(total(lg) - total(s)) / span:6.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--short", type=int, default=50)
    ap.add_argument("--long", type=int, default=250)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--once", choices=["lstm", "gru"])
    ap.add_argument("--stack", action="store_true", help="also the two-layer inference, stacked and layered")
    ap.add_argument("--stack-only", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.once:
        run_layer(a.once, a.short, dtype)
        return
    if a.stack or a.stack_only:
        stack_steps(("lstm", "gru"), a, dtype)
        if a.stack_only:
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
