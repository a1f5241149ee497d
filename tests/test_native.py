"""The native checks of tests/native/: C++ programs that include the CUDA kernels'
per-element helpers (host-device code) with the host compiler and compare them bit for bit
with brute-force definitions, so that CPU-only machines (CI) exercise the arithmetic the GPU
kernels run; the persistent RNN kernels run under a CPU emulation of CUDA with
ThreadSanitizer (barrier placement); the conv2d GEMM and depthwise tile kernels run under
the same emulation against a float64 convolution, and the NCHW -> NHWC copy kernels against
the permutation.  Skipped where no C++ compiler is found."""
import os
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as cpp

from helpers import ROOT

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
# source: extra compiler flags.  The race check runs the persistent RNN kernels under the CPU
# emulation with ThreadSanitizer: a missing barrier is a data race it reports (exit status 66).
CHECKS = {"max_pool2d_items_check.cpp": [], "rnn_persistent_race_check.cpp": ["-g", "-fsanitize=thread"],
          "conv2d_gemm_check.cpp": ["-pthread"], "conv2d_depthwise_check.cpp": ["-pthread"],
          "layout_check.cpp": ["-pthread"]}
# Checks that include the CUDA toolkit's host-usable headers (cuda_fp16.h and friends).
NEEDS_CUDA_HEADERS = {"conv2d_gemm_check.cpp"}


def cuda_include_dir():
    """A CUDA toolkit include directory with cuda_fp16.h and crt/host_defines.h (the pip
    packages beside torch lack the latter), or None."""
    import glob
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp.CUDA_HOME, "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        inc = os.path.join(home, "include")
        if all(os.path.exists(os.path.join(inc, f)) for f in ("cuda_fp16.h", os.path.join("crt", "host_defines.h"))):
            return inc
    return None


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", list(CHECKS))
def test_native_check(source, tmp_path):
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    exe = tmp_path / "check"
    cmd = [CXX, "-std=c++20", "-O1", "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(ROOT, "tests", "native")]
    if source in NEEDS_CUDA_HEADERS:
        inc = cuda_include_dir()
        if inc is None:
            pytest.skip("no CUDA toolkit headers (cuda_fp16.h) found")
        cmd += ["-I" + os.path.join(ROOT, "tests", "native", "wmma"), "-I" + inc]
    cmd += ["-I" + p for p in cpp.include_paths()] + CHECKS[source] + [
        os.path.join(ROOT, "tests", "native", source), "-o", str(exe), "-L" + lib, "-lc10", "-Wl,-rpath," + lib,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0 and "-fsanitize=thread" in CHECKS[source] and "tsan" in build.stderr:
        pytest.skip("no ThreadSanitizer runtime for this compiler")
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0 and " 0 fails" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
