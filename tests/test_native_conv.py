"""The conv2d GEMM and depthwise tile kernels under the CPU emulation of CUDA, against a float64
convolution (tests/native/; the machinery and the other checks are tests/test_native.py's).  A
file of their own so that the two pytest-xdist workers each take part of the native checks."""
import pytest

from test_native import CONV_CHECKS, run_check


@pytest.mark.parametrize("source", CONV_CHECKS)
def test_native_conv_check(source, tmp_path):
    run_check(source, tmp_path)
