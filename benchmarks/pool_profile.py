"""Where max_pool2d's time goes on CUDA, ours against torch's, per kernel, at the benchmark's
pooling layers: device time per call of each kernel, from torch.profiler, for the inference
forward (no grad: the benchmark's forward rows) and for forward+backward (the training forward,
which also saves the argmax, then the backward), each with its share of the copy roofline by
the benchmark's own byte count.

The benchmark gives one number per row; this says which kernel a forward+backward row spends its
time in (the training forward or the backward cells), which kernel each row took (the template
arguments show the round: channels an item, values-only form, pair, quad or row4 kernels), and
the device time against the row's time, so that host-bound rows show.

    python benchmarks/pool_profile.py [--dtypes float32,float16,bfloat16] [--formats nchw,channels_last]
                                      [--layers 'VGG 2x2/2'] [-n 20] [--top 3]"""
import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

import convrnn_kernels as ck
from conv_profile import short  # benchmarks/, this script's directory
from convrnn_kernels.bench.core import copy_roofline_gbps
from convrnn_kernels.bench.pooling import LAYERS


def profile(step, n):
    """({kernel: us per call}, total device us per call) of n calls of step()."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[short(ev.name, 110)] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / n
    return dict(per), sum(per.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--layers", default="", help="comma list of layer labels (default: all)")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--top", type=int, default=3, help="kernels shown per side and direction")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pool_profile.py needs a CUDA GPU")
    wanted = [s.strip() for s in a.layers.split(",") if s.strip()]
    roof, _ = copy_roofline_gbps(torch.device("cuda"), quick=False)  # the benchmark's own roofline
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, n {a.n}, copy roofline "
          f"{roof:.0f} GB/s; device microseconds per call by kernel (% of the roofline by the bench's bytes)")
    for label, n, c, h, w, k, s, p in LAYERS:
        if wanted and label not in wanted:
            continue
        for dtype_name in a.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for fmt in a.formats.split(","):
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=mf)
                args = dict(kernel_size=k, stride=s, padding=p)
                out = F.max_pool2d(x, **args)
                gout = torch.randn_like(out)
                # the bench's bytes: forward = input + output; forward+backward adds grad_output,
                # the input again and grad_input
                fwd_bytes = (x.numel() + out.numel()) * x.element_size()
                fb_bytes = fwd_bytes + (gout.numel() + 2 * x.numel()) * x.element_size()
                print(f"\n{label} {dtype_name} {fmt}")
                for side, fn in (("ours ", ck.max_pool2d), ("torch", F.max_pool2d)):
                    def inference():
                        with torch.no_grad():
                            fn(x, **args)

                    leaf = x.detach().requires_grad_(True)

                    def training():
                        torch.autograd.grad(fn(leaf, **args), leaf, gout)

                    for direction, step, nbytes in (("forward", inference, fwd_bytes),
                                                    ("forward+backward", training, fb_bytes)):
                        per, total = profile(step, a.n)
                        pct = 100 * nbytes / (total * 1e-6) / 1e9 / roof if total else float("nan")
                        top = sorted(per.items(), key=lambda kv: -kv[1])[:a.top]
                        print(f"  {side} {direction:16s} {total:8.1f} us ({pct:5.1f}%): " +
                              "; ".join(f"{us:.1f} {name}" for name, us in top))


if __name__ == "__main__":
    main()
