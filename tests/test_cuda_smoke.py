"""A small CUDA subset that benchmarks/gpu_check.sh runs under compute-sanitizer memcheck:
every kernel (forward, each backward path, both layouts, a half type) once on small
inputs, checked against the CPU kernels.  Skipped where there is no GPU."""
import pytest
import torch

import convrnn_kernels as ck

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POOLS = [  # kernel, stride, padding, dilation, ceil_mode; (2, 2, 0) tiles 8x8 exactly
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, True),
    (3, 1, 1, 2, False),
]


def _both(fn, x, grad_of_out):
    outs = []
    for dev in ("cpu", "cuda"):
        xi = x.detach().to(dev).requires_grad_()
        y = fn(xi)
        y.backward(grad_of_out(y).to(dev))
        outs.append((y.cpu(), xi.grad.cpu()))
    return outs


@pytest.mark.parametrize("cfg", POOLS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sanitizer_pools(cfg, channels_last, dtype):
    k, s, p, d, ceil = cfg
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else {}
    (a, ga), (b, gb) = _both(lambda t: ck.max_pool2d(t, k, s, p, d, ceil_mode=ceil), x, torch.ones_like)
    torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ga, gb, **tol)
    (a, ga), (b, gb) = _both(lambda t: ck.avg_pool2d(t, k, s, min(p, k // 2), ceil_mode=ceil), x, torch.ones_like)
    torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sanitizer_lrn(channels_last):
    x = torch.randn(2, 7, 5, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    (a, ga), (b, gb) = _both(lambda t: ck.local_response_norm(t, 5, 1e-2, 0.75, 2.0), x, torch.ones_like)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_sanitizer_indices():
    x = torch.randn(2, 3, 9, 9)
    a = ck.max_pool2d(x, 3, 2, 1, return_indices=True)
    b = ck.max_pool2d(x.cuda(), 3, 2, 1, return_indices=True)
    assert torch.equal(a[1], b[1].cpu())
