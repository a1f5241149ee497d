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
@pytest.mark.parametrize("channels", [3, 4, 8])  # channels_last: 1, 4 and (float16) 8 channels an item
def test_sanitizer_pools(cfg, channels_last, dtype, channels):
    k, s, p, d, ceil = cfg
    x = torch.randn(2, channels, 8, 8, dtype=dtype)
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


@pytest.mark.parametrize("cell", ["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sanitizer_cells(cell, dtype):
    gates = {"lstm_cell": 4, "gru_cell": 3}.get(cell, 1)
    b, i, h = 3, 5, 7
    args = [torch.randn(b, i), torch.randn(b, h)] + ([torch.randn(b, h)] if cell == "lstm_cell" else [])
    args += [torch.randn(gates * h, i), torch.randn(gates * h, h), torch.randn(gates * h), torch.randn(gates * h)]
    outs = []
    for dev in ("cpu", "cuda"):
        t = [a.detach().to(dev, dtype).requires_grad_() for a in args]
        fn = getattr(ck, cell)
        y = fn(t[0], (t[1], t[2]), *t[3:]) if cell == "lstm_cell" else fn(*t)
        y = sum(y) if isinstance(y, tuple) else y
        y.sum().backward()
        outs.append([y.float().cpu()] + [a.grad.float().cpu() for a in t])
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else {}
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, **tol)


CONVS = [  # input shape, weight shape, stride, padding, dilation, groups: each CUDA conv path once
    ((2, 16, 9, 9), (32, 16, 3, 3), 1, 1, 1, 1),     # tiled implicit GEMM
    ((2, 3, 19, 19), (8, 3, 5, 5), 3, 1, 1, 1),      # small C, stride 3: backward-data phases
    ((2, 32, 7, 7), (16, 32, 1, 1), 1, 0, 1, 1),     # 1x1
    ((2, 8, 9, 9), (16, 1, 3, 3), 2, 1, 2, 8),       # depthwise, multiplier 2, dilation 2
    ((2, 8, 9, 8), (6, 4, 2, 3), (2, 1), (1, 0), 1, 2),  # groups, even kernel
    ((2, 8, 9, 10), (8, 1, 3, 3), 1, 1, 1, 8),       # depthwise 3x3/1: channels_last's vector kernel
]


@pytest.mark.parametrize("cfg", CONVS, ids=["gemm", "strided", "1x1", "depthwise", "groups", "depthwise-vec"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float64, False),
                                        (torch.bfloat16, False)], ids=["f32", "tf32", "f64", "bf16"])
def test_sanitizer_conv2d(cfg, channels_last, dtype, tf32):
    shape, wshape, stride, padding, dilation, groups = cfg
    x, w, b = torch.randn(shape), torch.randn(wshape) / (wshape[1] * wshape[2] * wshape[3]) ** 0.5, torch.randn(wshape[0])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        outs = []
        for dev in ("cpu", "cuda"):
            t = [a.detach().to(dev, dtype if dev == "cuda" else torch.float64).requires_grad_() for a in (x, w, b)]
            y = ck.conv2d(*t, stride=stride, padding=padding, dilation=dilation, groups=groups)
            y.backward(torch.ones_like(y))
            outs.append([y.double().cpu()] + [a.grad.double().cpu() for a in t])
    finally:
        torch.backends.cudnn.allow_tf32 = old
    tol = {torch.float64: 1e-10, torch.float32: 5e-3 if tf32 else 1e-5, torch.bfloat16: 3e-2}[dtype]
    for got, ref in zip(outs[1], outs[0]):
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_sanitizer_rnn_layers(mode):
    torch.manual_seed(0)
    mods = [getattr(ck.nn, mode)(5, 7, num_layers=2, bidirectional=True).double() for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    mods[1].cuda()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    res = []
    for m, dev in zip(mods, ("cpu", "cuda")):
        xi = x.detach().to(dev).requires_grad_()
        out = m(xi)[0]
        out.sum().backward()
        res.append((out.cpu(), xi.grad.cpu()))
    torch.testing.assert_close(res[1][0], res[0][0])
    torch.testing.assert_close(res[1][1], res[0][1])
