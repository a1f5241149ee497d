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


# avg_pool2d's channels_last forward streams float outputs of 16 MiB or more past the caches
# (csrc/cpu/avg_pool2d.cpp, forward_pixels_streamed): the same sums in the same order, so the same
# bits as the plain loop, over the window options and channel counts (64-channel blocks, 16-channel
# blocks, and a count the streamed loop declines).
@pytest.mark.parametrize("channels", [64, 48, 40])
@pytest.mark.parametrize("opts", [dict(kernel_size=2, stride=2),
                                  dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
                                  dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=5)],
                         ids=["2x2s2", "3x3s2p1-exclude-pad", "3x3s2p1-ceil-divisor"])
def test_avg_pool2d_streamed_forward(channels, opts):
    from helpers import switched
    ops = torch.ops.convrnn
    x = torch.randn(26, channels, 130, 130, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    with switched(ops._avg_pool2d_streamed, False):
        plain = ck.avg_pool2d(x, **opts)
    with switched(ops._avg_pool2d_streamed, True) as s:
        streamed = ck.avg_pool2d(x, **opts)
    assert plain.nbytes >= 16 << 20
    assert s.launches == (1 if channels % 16 == 0 else 0)
    assert torch.equal(streamed, plain)
    torch.testing.assert_close(streamed, F.avg_pool2d(x, **opts), rtol=1e-5, atol=1e-6)
