"""Build convrnn_kernels._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA
build and a CUDA toolkit is found.  No GPU is needed to compile.

Environment knobs
  CONVRNN_CPU_ONLY=1       build the CPU kernels only, even where CUDA could be built
  CONVRNN_CUDA_ARCHS=...   CUDA architectures, e.g. "8.0;9.0+PTX" (the default);
                           TORCH_CUDA_ARCH_LIST is honoured when this is unset
  CONVRNN_DEBUG=1          -O0 -g host code, -G device code, no NDEBUG
  CUDA_HOME=...            the CUDA toolkit; when unset, setup.py finds it itself
  MAX_JOBS=N               parallel compile jobs (ninja)

Two traps this file resolves itself (see _resolve_cuda_home and _cuda_header_shim):
torch guesses CUDA_HOME from where `nvcc` sits on PATH, which is wrong where that nvcc is a
wrapper script outside the toolkit; and ATen's CUDA headers include cusparse.h, cublas_v2.h
and friends, which the pip CUDA build of torch keeps in the nvidia packages beside torch,
not in the toolkit.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_target(nvcc):
    """Follow a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return os.path.dirname(os.path.dirname(nvcc))
    for word in head.decode("utf-8", "replace").split():
        word = word.strip("'\"")
        if word.endswith("/bin/nvcc") and os.path.isfile(word):
            return os.path.dirname(os.path.dirname(os.path.realpath(word)))
    return None


def _resolve_cuda_home(torch_cuda_version):
    """CUDA_HOME when set wins; then the toolkit behind nvcc on PATH (through wrappers);
    then the usual install folders, preferring torch's CUDA version."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if _is_toolkit(env) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(_nvcc_target(nvcc))
    if torch_cuda_version:
        candidates.append(f"/usr/local/cuda-{torch_cuda_version}")
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def _cuda_header_shim(cuda_home):
    """A folder of links to the headers that ATen needs but the toolkit lacks (cusparse.h,
    cublas_v2.h, ...), taken from the pip nvidia packages beside torch.  Only missing
    headers are linked, so the toolkit's own cuda_runtime.h and friends always win."""
    import torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    have = set(os.listdir(os.path.join(cuda_home, "include")))
    shim = os.path.join(ROOT, "build", "cuda_header_shim")
    shutil.rmtree(shim, ignore_errors=True)
    os.makedirs(shim)
    linked = 0
    for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        for name in os.listdir(inc):
            if name in have or os.path.exists(os.path.join(shim, name)):
                continue
            os.symlink(os.path.join(inc, name), os.path.join(shim, name))
            linked += 1
    return shim if linked else None


def _extensions():
    import torch

    want_cuda = torch.version.cuda is not None and not _flag("CONVRNN_CPU_ONLY")
    cuda_home = _resolve_cuda_home(torch.version.cuda) if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    from torch.utils import cpp_extension as ce
    if cuda_home:
        ce.CUDA_HOME = cuda_home
    with_cuda = bool(cuda_home)

    archs = os.environ.get("CONVRNN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    debug = _flag("CONVRNN_DEBUG")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    openmp = sys.platform.startswith("linux")
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # -g0: Python's own CFLAGS carry -g
    # -fno-trapping-math: without it GCC will not if-convert a select around a division (tanh_of's
    # x P / Q, rnn_cells.h) for AVX2, which has no masked division, and every float gate loop's
    # x86-64-v3 clone stayed scalar ("control flow in loop"; the v4 clones were vectorised).  No
    # result changes: the flag only lets the compiler ignore floating-point exception flags.
    cxx += ["-fno-math-errno", "-fno-trapping-math", "--param", "vect-partial-vector-usage=1"]
    cxx += ["-fopenmp"] if openmp else ["-fopenmp-simd"]  # the latter: `omp simd` reductions only
    nvcc = ["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
             "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    macros = [("CONVRNN_VERSION", f'"{VERSION}"'), ("CONVRNN_CUDA_ARCHS", f'"{archs if with_cuda else ""}"'),
              ("CONVRNN_OPENMP", "1" if openmp else "0")]
    if with_cuda:
        macros.append(("CONVRNN_WITH_CUDA", "1"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        shim = _cuda_header_shim(cuda_home)
        if shim:
            include_dirs.append(shim)
    if not debug:
        macros.append(("NDEBUG", None))

    print(f"convrnn_kernels setup: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"CUDA kernels {'ON' if with_cuda else 'OFF'}, CUDA_HOME={cuda_home}, "
          f"archs={archs if with_cuda else '-'}, openmp={openmp}, debug={debug}, "
          f"sources={len(sources)}", flush=True)

    Ext = ce.CUDAExtension if with_cuda else ce.CppExtension
    ext = Ext(
        name="convrnn_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=(["-fopenmp"] if openmp else []),
    )
    return [ext], ce.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(
    name="convrnn_kernels",
    version=VERSION,
    description="Hand-written CPU and CUDA kernels for the layers of convolutional and recurrent networks",
    packages=find_packages(include=["convrnn_kernels", "convrnn_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "bench": ["tqdm"]},
)
