"""The host time of a cell's gate products on CUDA, by dtype and gate width: the question left by
session 12 (benchmarks/NOTES.md, "GPU session 12"), where the GRU cell's forward in float16 took
~18-30 us more host time a call than in float32 or bfloat16, on torch's side as on ours, while
the LSTM's float16 forward did not.  The GRU's products are (B x I) by (I x 3H) and (B x H) by
(H x 3H); the LSTM's are 4H wide.  This times torch.mm into a preallocated output (as our cells
call it) and torch.addmm with a bias (as torch's cells call it) for the bench's cell shapes and
the gate widths 1H-4H, so one run says whether the extra host time belongs to cuBLAS at some
widths in float16.

    python benchmarks/cells_gemm_probe.py [-n 300]
Prints one row per (dtype, B, K, N): host us a call for mm_out and addmm (enqueueing n calls
back to back) and the back-to-back GPU time a call."""
import argparse
import time

import torch

SHAPES = ((1, 65, 128), (1, 128, 128), (64, 256, 512), (64, 512, 512))  # (B, K, H): inputs, hidden


def per_call_us(fn, n):
    """(host us, back-to-back us) a call."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cells_gemm_probe: no CUDA device")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us a call (host / back-to-back)")
    print(f"{'dtype':9} {'B':>3} {'K':>4} {'N':>5} | {'mm_out host':>11} {'loop':>7} | {'addmm host':>10} {'loop':>7}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, k, h in SHAPES:
            for gates in (1, 2, 3, 4):
                n_cols = gates * h
                g = torch.Generator(device="cuda").manual_seed(0)
                a = torch.randn(b, k, device="cuda", generator=g).to(dtype)
                w = torch.randn(n_cols, k, device="cuda", generator=g).to(dtype)
                bias = torch.randn(n_cols, device="cuda", generator=g).to(dtype)
                out = torch.empty(b, n_cols, device="cuda", dtype=dtype)
                mm = per_call_us(lambda: torch.mm(a, w.t(), out=out), args.n)
                addmm = per_call_us(lambda: torch.addmm(bias, a, w.t()), args.n)
                print(f"{str(dtype)[6:]:9} {b:3d} {k:4d} {n_cols:5d} | {mm[0]:11.2f} {mm[1]:7.2f} | "
                      f"{addmm[0]:10.2f} {addmm[1]:7.2f}")


if __name__ == "__main__":
    main()
