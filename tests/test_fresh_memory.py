"""CPU outputs of 32 MiB or more (csrc/cpu/fresh_memory.h): their pages are mapped in bulk before
the kernels write them, where the memory is fresh.  The results match torch's, on a first call (a
fresh mmap) and on calls that may reuse memory already mapped."""
import pytest
import torch
import torch.nn.functional as F

import convrnn_kernels as ck

# 33 x 64 x 64 x 64 floats: 34.6 MB, past the 32 MiB threshold (and the gradients with it)
SHAPE = (33, 64, 64, 64)
CASES = {
    "max_pool2d": (lambda x: ck.max_pool2d(x, 2, 2), lambda x: F.max_pool2d(x, 2, 2)),
    "max_pool2d_3x3": (lambda x: ck.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
    "avg_pool2d": (lambda x: ck.avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "local_response_norm": (lambda x: ck.local_response_norm(x, 5), lambda x: F.local_response_norm(x, 5)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", list(CASES))
def test_large_outputs_match_torch(op, channels_last):
    ours_fn, torch_fn = CASES[op]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = None
    for _ in range(2):  # the second call may get the first's memory back, mapped
        xo, xt = x.detach().requires_grad_(), x.detach().requires_grad_()
        out, ref = ours_fn(xo), torch_fn(xt)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(grad)
        if want is None:
            ref.backward(grad)
            want = (ref.detach(), xt.grad)
        assert xo.grad.nbytes >= 32 << 20
        torch.testing.assert_close(out.detach(), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xo.grad, want[1], rtol=1e-5, atol=1e-5)



# The pooling ops stream float channels_last outputs and gradients of 16 MiB or more past the caches
# (cpu/pool_loops.h, streams): avg_pool2d's forward, and the backward of both ops over tiled windows
# (kernel = stride, no padding).  The same values in the same order as the plain loops: the same bits,
# over the window options, channel counts (64-channel blocks, 16-channel blocks, and a count the
# streamed loops decline) and both tap types of max_pool2d's argmax (uint8, int32 past 255 taps).
# The streamed loops are AVX-512 code (non-temporal 64-byte stores); without it the plain loops run.
STREAMS = "AVX-512" in ck.build_info()["cpu_kernels"]


def _streamed_and_plain(fn, x, grad_seed=4):
    from helpers import switched
    results = []
    for on in (False, True):
        with switched(torch.ops.convrnn._pool2d_streamed, on) as s:
            xi = x.detach().requires_grad_()
            out = fn(xi)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
        results.append((out.detach(), xi.grad, s.launches))
    return results


AVG_OPTS = {"2x2s2": dict(kernel_size=2, stride=2),
            "3x3s2p1-exclude-pad": dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
            "3x3s2p1-ceil-divisor": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=5)}


@pytest.mark.parametrize("channels", [64, 48, 40])
@pytest.mark.parametrize("opts", list(AVG_OPTS))
def test_avg_pool2d_streamed(channels, opts):
    kw = AVG_OPTS[opts]
    x = torch.randn(26, channels, 130, 130, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    (out0, grad0, n0), (out1, grad1, n1) = _streamed_and_plain(lambda t: ck.avg_pool2d(t, **kw), x)
    assert out0.nbytes >= 16 << 20 and n0 == 0
    streamable = channels % 16 == 0 and STREAMS
    assert n1 == (2 if streamable and opts == "2x2s2" else 1 if streamable else 0)  # forward, tiled backward
    assert torch.equal(out1, out0) and torch.equal(grad1, grad0)
    xt = x.detach().requires_grad_()
    ref = F.avg_pool2d(xt, **kw)
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(out1, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad1, xt.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [64, 48, 40])
@pytest.mark.parametrize("kernel", [2, 16], ids=["uint8-taps", "int32-taps"])
def test_max_pool2d_streamed_backward(channels, kernel):
    x = torch.randn(12, channels, 96, 96, generator=torch.Generator().manual_seed(3))
    x[:, :, ::7, ::5] = x[:, :, 1::7, ::5]  # ties: the first maximum takes the gradient
    x = x.contiguous(memory_format=torch.channels_last)
    (out0, grad0, n0), (out1, grad1, n1) = _streamed_and_plain(lambda t: ck.max_pool2d(t, kernel, kernel), x)
    assert grad0.nbytes >= 16 << 20 and n0 == 0
    assert n1 == (1 if channels % 16 == 0 and STREAMS else 0)
    assert torch.equal(out1, out0) and torch.equal(grad1, grad0)
    xt = x.detach().requires_grad_()
    ref = F.max_pool2d(xt, kernel, kernel)
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(grad1, xt.grad, rtol=0, atol=0)


def test_streamed_switch_errors_name_the_op():
    ops = torch.ops.convrnn
    before, _ = ops._pool2d_streamed(-1)
    with pytest.raises(RuntimeError, match=r"convrnn\._pool2d_streamed: mode"):
        ops._pool2d_streamed(2)
    assert ops._pool2d_streamed(-1)[0] == before
