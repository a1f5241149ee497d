"""One thread, our panel GEMM (csrc/cpu/panel_gemm.cpp) called directly, without the ops around it:
times cpu_gemm::gemm for the products of the B=64 cells (and a few others) in one or more versions
of panel_gemm.cpp, interleaved round by round, and reports each version's best time and GF/s.

    python benchmarks/panel_gemm_ab.py [FILE.cpp ...] [--shapes fgx,dX,...] [--rounds 15]

Each FILE is a copy of csrc/cpu/panel_gemm.cpp (default: the tree's own), with its own
panel_gemm.h where one lies beside it (else the tree's), built into its own extension with torch.utils.cpp_extension (about 40 s each, cached under /tmp/panel_gemm_ab).
Used in session 22 (benchmarks/NOTES.md) to judge the AVX2 strip layout on a shared machine,
where whole-op timings swing 20-50% between runs.  --check compares two or more versions' results
bit for bit on odd shapes instead of timing."""
import argparse
import hashlib
import itertools
import os
import sys

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = r'''
#include <torch/extension.h>
#include <chrono>
#include "%s"
double bench(bool ta, bool tb, int64_t m, int64_t n, int64_t k, bool acc, int64_t calls) {
  auto A = ta ? torch::randn({k, m}) : torch::randn({m, k});
  auto B = tb ? torch::randn({n, k}) : torch::randn({k, n});
  auto C = torch::randn({m, n});
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i)
    TORCH_CHECK(convrnn::cpu_gemm::gemm(ta, tb, m, n, k, A.data_ptr<float>(), A.size(1), B.data_ptr<float>(),
                                        B.size(1), acc, C.data_ptr<float>(), n), "not served");
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / calls;
}
torch::Tensor product(bool ta, bool tb, torch::Tensor A, torch::Tensor B, torch::Tensor C, bool acc) {
  const int64_t k = ta ? A.size(0) : A.size(1);
  TORCH_CHECK(convrnn::cpu_gemm::gemm(ta, tb, C.size(0), C.size(1), k, A.data_ptr<float>(), A.size(1),
                                      B.data_ptr<float>(), B.size(1), acc, C.data_ptr<float>(), C.size(1)), "not served");
  return C;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("bench", &bench); m.def("product", &product); }
'''
# name: (ta, tb, m, n, k, accumulate): the LSTM cell at B=64 (I=256, H=512) as each of 2 threads runs it
SHAPES = {
    "fgx": (False, True, 64, 1024, 256, False),   # forward, x w_ih^T, half the gate columns
    "fgh": (False, True, 64, 1024, 512, True),    # forward, + h w_hh^T
    "dX": (False, False, 64, 256, 2048, False),   # grad_input = g w_ih
    "dH": (False, False, 64, 512, 2048, False),   # grad_hx = g w_hh
    "dWih": (True, False, 2048, 256, 64, False),  # grad_w_ih = g^T x
    "dWhh": (True, False, 2048, 512, 64, False),  # grad_w_hh = g^T h
    "l2": (False, False, 96, 128, 256, False),    # everything in L2
    "mid": (False, False, 600, 1024, 256, False),
    "b48": (False, True, 48, 1024, 256, False),
}


def build(src):
    src = os.path.abspath(src)
    text = open(src).read().replace('"../switches.h"', '"switches.h"')
    header = os.path.join(os.path.dirname(src), "panel_gemm.h")  # a version's own header, where it has one
    header_text = open(header).read() if os.path.exists(header) else None
    tag = hashlib.sha1((text + (header_text or "")).encode()).hexdigest()[:10]
    d = os.path.join("/tmp/panel_gemm_ab", tag)
    os.makedirs(d, exist_ok=True)
    copy, harness = os.path.join(d, "panel_gemm.cpp"), os.path.join(d, "harness.cpp")
    files = [(copy, text), (harness, HARNESS % copy)]
    if header_text is not None:
        files.append((os.path.join(d, "panel_gemm.h"), header_text))
    for path, body in files:
        if not os.path.exists(path) or open(path).read() != body:
            open(path, "w").write(body)
    return load(name="panel_gemm_ab_" + tag, sources=[harness], build_directory=d,
                extra_cflags=["-O3", "-fno-math-errno", "-fno-trapping-math", "-I" + os.path.join(ROOT, "csrc"),
                              "-I" + os.path.join(ROOT, "csrc", "cpu")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", default=[os.path.join(ROOT, "csrc", "cpu", "panel_gemm.cpp")])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    mods = [build(f) for f in args.files]
    names = list(args.files)
    torch.set_num_threads(1)
    if args.check:
        torch.manual_seed(0)
        for (m, n, k), ta, tb, acc in itertools.product(
                [(1, 64, 128), (2, 100, 70), (3, 64, 256), (7, 130, 300), (64, 512, 600), (100, 33, 17),
                 (5, 17, 600), (64, 1000, 257), (97, 200, 513), (2048, 300, 64)], *[[False, True]] * 3):
            A = torch.randn(k, m) if ta else torch.randn(m, k)
            B = torch.randn(n, k) if tb else torch.randn(k, n)
            C = torch.randn(m, n)
            try:
                res = [mod.product(ta, tb, A, B, C.clone(), acc) for mod in mods]
            except RuntimeError:
                continue  # a form the kernel does not serve (a short product with B transposed)
            same = all(torch.equal(res[0], r) for r in res[1:])
            print((m, n, k, ta, tb, acc), "same bits" if same else "DIFFERENT")
        return
    for key in args.shapes.split(","):
        ta, tb, m, n, k, acc = SHAPES[key]
        calls = max(2, int(2e7 / (2 * m * n * k)))
        best = [float("inf")] * len(mods)
        for _ in range(args.rounds):
            for i, mod in enumerate(mods):
                best[i] = min(best[i], mod.bench(ta, tb, m, n, k, acc, calls))
        flop = 2 * m * n * k / 1e6
        print(f"{key:5} {str((m, n, k, ta, tb)):28}",
              " | ".join(f"{nm} {b:.3f} ms {flop / b:5.1f} GF/s" for nm, b in zip(names, best)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
