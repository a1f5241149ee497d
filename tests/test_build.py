"""What the build reports (ck.build_info()) and what it registered with the dispatcher."""
import pytest
import torch

from helpers import import_ck

ck = import_ck("build_info")

OP_NAMES = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "local_response_norm",
            "local_response_norm_backward"]


def test_build_info_keys_and_types():
    info = ck.build_info()
    assert isinstance(info, dict)
    missing = {"cuda", "cuda_archs", "openmp", "version", "torch"} - set(info)
    assert not missing, f"build_info() lacks {sorted(missing)}"
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], (str, list, tuple))
    if info["cuda"]:
        assert len(info["cuda_archs"]) > 0, "a CUDA build names its architectures"
    assert isinstance(info["version"], str) and info["version"]
    if hasattr(ck, "__version__"):
        assert info["version"] == ck.__version__
    assert str(info["torch"]).split("+")[0] == torch.__version__.split("+")[0]


def test_build_info_is_a_copy():
    info = ck.build_info()
    info["cuda"] = "changed"
    assert ck.build_info()["cuda"] != "changed"


@pytest.mark.parametrize("name", OP_NAMES)
def test_ops_are_registered(name):
    op = getattr(torch.ops.convrnn, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"), f"{name}: no CPU kernel"
    if ck.build_info()["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA"), f"{name}: no CUDA kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_built_where_a_gpu_runs():
    assert ck.build_info()["cuda"], "a GPU is present but the extension was built without CUDA kernels"


def test_public_api():
    for name in ("max_pool2d", "avg_pool2d", "local_response_norm", "build_info", "reference"):
        assert hasattr(ck, name), name
    for name in ("MaxPool2d", "AvgPool2d", "LocalResponseNorm"):
        assert hasattr(ck.nn, name), name
    for name in ("max_pool2d", "avg_pool2d", "local_response_norm", "pool_output_size"):
        assert callable(getattr(ck.reference, name)), name
