"""Where conv2d's forward+backward time goes, ours against torch's (cuDNN / oneDNN), per
kernel, at the benchmark's layer shapes: device time per iteration of each kernel (CUDA) or
self CPU time of each op (CPU), from torch.profiler, summed over n iterations.

The benchmark gives one number per layer and direction; this splits it into the forward
GEMM, the backward-data GEMM, the weight-gradient GEMM and its chunk reduction, the bias sums,
layout copies and weight packing, so the next change goes where the time is; and it times the
forward alone per call, host enqueue against back-to-back device time, to tell a kernel-bound
row from a host-bound one.

    python benchmarks/conv_profile.py [--device cuda] [--dtype float32] [--formats nchw,channels_last]
                                      [--layers 'AlexNet CONV2,7x7/2 stem'] [-n 20] [--top 6]
float32 runs with TF32 off on both sides (the benchmark's main comparison)."""
import argparse
import re
from collections import defaultdict

import torch
import torch.nn.functional as F

import convrnn_kernels as ck
from convrnn_kernels.bench.conv import LAYERS, _inputs


def short(name, width=90):
    """A kernel's name without return type, namespaces and argument list (template arguments kept),
    cut to width characters."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)
    name = re.sub(r"(?:\b(?:convrnn|conv|at|native|cudnn|c10)|\(anonymous namespace\))::", "", name)
    return name[:width]


def profile(fn, args, grad_out, n, dev):
    """({kernel or op: us per iteration}, total us per iteration) of n forward+backward calls."""
    leaves = [a.detach().requires_grad_(True) for a in args]

    def step():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out)

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    per = defaultdict(float)
    if dev.type == "cuda":
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[short(ev.name)] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / n
    else:
        for ev in prof.key_averages():
            if ev.self_cpu_time_total > 0:
                per[ev.key] += ev.self_cpu_time_total / n
    return dict(per), sum(per.values())


def forward_times(fn, args, n, dev):
    """(host_us, loop_us) per forward call without grad: the wall time to enqueue n calls
    back to back, and (CUDA) the events around them.  A kernel shorter than the host path
    shows as loop_us ~ host_us: then the benchmark's row measures the host, not the kernel."""
    import time
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        host = (time.perf_counter() - t0) / n * 1e6
        loop = float("nan")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn(*args)
            end.record()
            torch.cuda.synchronize(dev)
            loop = start.elapsed_time(end) / n * 1e3
    return host, loop


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--layers", default="", help="comma list of layer labels (default: all)")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--top", type=int, default=6, help="kernels shown per side")
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    wanted = [s.strip() for s in a.layers.split(",") if s.strip()]
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{a.dtype}, TF32 off, n {a.n}; forward+backward, microseconds per iteration "
          f"({'device time by kernel' if dev.type == 'cuda' else 'self CPU time by op'})")
    for label, n, c, h, w, k, r, stride, pad, groups in LAYERS:
        if wanted and label not in wanted:
            continue
        for fmt in a.formats.split(","):
            args = _inputs(n, c, h, w, k, r, groups, True, dev, dtype, fmt)
            kw = dict(stride=stride, padding=pad, groups=groups)
            out = F.conv2d(*args, **kw)
            g = torch.Generator(device=dev).manual_seed(0)
            grad_out = torch.randn(out.shape, device=dev, dtype=dtype, generator=g).contiguous(
                memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            ours, ours_total = profile(lambda *t: ck.conv2d(*t, **kw), args, grad_out, a.n, dev)
            theirs, theirs_total = profile(lambda *t: F.conv2d(*t, **kw), args, grad_out, a.n, dev)
            print(f"\n{label} {fmt}: ours {ours_total:.1f} us, torch {theirs_total:.1f} us "
                  f"(x{theirs_total / ours_total if ours_total else float('nan'):.2f})")
            oh, ol = forward_times(lambda *t: ck.conv2d(*t, **kw), args, a.n, dev)
            th, tl = forward_times(lambda *t: F.conv2d(*t, **kw), args, a.n, dev)
            print(f"  forward alone, us a call (host enqueue / back-to-back): ours {oh:.1f} / {ol:.1f}, "
                  f"torch {th:.1f} / {tl:.1f}")
            for side, per in (("ours ", ours), ("torch", theirs)):
                for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:a.top]:
                    print(f"  {side} {us:9.1f}  {name}")


if __name__ == "__main__":
    main()
