"""The references (convrnn_kernels/reference.py) against torch.nn.functional: forward values,
max-pool indices, gradients, special values, and random shapes.  The reference is loaded by
file path, so this file runs before (and without) the compiled extension."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from helpers import (AVG_GEOMETRIES, AVG_OPTIONS, LRN_CONFIGS, MAX_CONFIGS, SPECIAL_KINDS, assert_close,
                     cfg_id, dtype_id, forward_backward, load_reference, make_input, special_input)

ref = load_reference()


def test_pool_output_size_matches_torch():
    for n, k, s, d, ceil in itertools.product(range(1, 8), range(1, 5), range(1, 4), (1, 2), (False, True)):
        for p in range(0, k // 2 + 1):
            x = torch.zeros(1, 1, 1, n)
            try:
                expected = F.max_pool2d(x, (1, k), (1, s), (0, p), (1, d), ceil_mode=ceil).shape[-1]
            except RuntimeError:
                expected = None
            got = ref.pool_output_size(n, k, s, p, d, ceil)
            assert (got if got >= 1 else None) == expected, (n, k, s, p, d, ceil)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg", MAX_CONFIGS, ids=cfg_id)
def test_max_pool2d(cfg, dtype):
    shape, k, s, p, d, ceil = cfg
    x = make_input(shape, dtype)
    fn = lambda f: (lambda t: f(t, k, s, p, d, ceil, return_indices=True))  # noqa: E731
    (out, idx), gx, gout = forward_backward(fn(ref.max_pool2d), x)
    (eout, eidx), egx, _ = forward_backward(fn(F.max_pool2d), x, gout)
    assert torch.equal(out, eout) and torch.equal(idx, eidx)
    if dtype in (torch.float32, torch.float64):
        assert_close(gx, egx, "grad")
    assert torch.equal(ref.max_pool2d(x, k, s, p, d, ceil), eout)


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("cfg", [MAX_CONFIGS[i] for i in (1, 2, 6, 7, 10)], ids=cfg_id)
def test_max_pool2d_special_values(cfg, kind):
    shape, k, s, p, d, ceil = cfg
    x = special_input(kind, shape, seed=3)
    out, idx = ref.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    eout, eidx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    torch.testing.assert_close(out, eout, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(idx, eidx)


def test_max_pool2d_window_without_image_tap():
    # k=2, d=3, p=1 on H=2: the window at -1 has taps -1 and 2, neither inside the image
    x = torch.arange(8.).reshape(1, 2, 2, 2)
    out, idx = ref.max_pool2d(x, (2, 1), 1, (1, 0), (3, 1), return_indices=True)
    eout, eidx = F.max_pool2d(x, (2, 1), 1, (1, 0), (3, 1), return_indices=True)
    assert torch.equal(out, eout) and torch.equal(idx, eidx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("opts", AVG_OPTIONS, ids=cfg_id)
@pytest.mark.parametrize("geo", AVG_GEOMETRIES, ids=cfg_id)
def test_avg_pool2d(geo, opts, dtype):
    shape, k, s, p = geo
    ceil, cip, div = opts
    x = make_input(shape, dtype)
    fn = lambda f: (lambda t: f(t, k, s, p, ceil, cip, div))  # noqa: E731
    out, gx, gout = forward_backward(fn(ref.avg_pool2d), x)
    eout, egx, _ = forward_backward(fn(F.avg_pool2d), x, gout)
    assert_close(out, eout, "out")
    assert_close(gx, egx, "grad")


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_avg_pool2d_special_values(kind):
    x = special_input(kind, (2, 3, 9, 9), seed=5)
    for ceil, cip, div in AVG_OPTIONS:
        out = ref.avg_pool2d(x, 3, 2, 1, ceil, cip, div)
        eout = F.avg_pool2d(x, 3, 2, 1, ceil, cip, div)
        torch.testing.assert_close(out, eout, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("cfg", LRN_CONFIGS, ids=cfg_id)
def test_local_response_norm(cfg, dtype):
    shape, size, alpha, beta, k = cfg
    x = make_input(shape, dtype) * 3
    fn = lambda f: (lambda t: f(t, size, alpha, beta, k))  # noqa: E731
    out, gx, gout = forward_backward(fn(ref.local_response_norm), x)
    eout, egx, _ = forward_backward(fn(F.local_response_norm), x, gout)
    # torch sums the squares in the input dtype through avg_pool: allow float32's rounding
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(out, eout, rtol=rtol, atol=rtol)
    torch.testing.assert_close(gx, egx, rtol=rtol, atol=rtol)


@given(n=st.integers(0, 2), c=st.integers(1, 3), h=st.integers(1, 10), w=st.integers(1, 10),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 3), data=st.data())
def test_max_pool2d_random(n, c, h, w, kh, kw, sh, sw, dh, dw, data):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    ceil = data.draw(st.booleans())
    ties = data.draw(st.booleans())
    shape = (n, c, h, w)
    x = special_input("ties", shape) if ties else make_input(shape)
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil)
    try:
        eout, eidx = F.max_pool2d(x, *args, return_indices=True)
    except RuntimeError:
        with pytest.raises(ValueError):
            ref.max_pool2d(x, *args, return_indices=True)
        return
    out, idx = ref.max_pool2d(x, *args, return_indices=True)
    assert torch.equal(out, eout)
    if eidx.numel() and int(eidx.max()) < h * w:   # torch's index is garbage where no tap is in the image
        assert torch.equal(idx, eidx)


@given(n=st.integers(0, 2), c=st.integers(1, 3), h=st.integers(1, 10), w=st.integers(1, 10),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ceil=st.booleans(), cip=st.booleans(), div=st.sampled_from([None, None, 1, 2, 7]), data=st.data())
def test_avg_pool2d_random(n, c, h, w, kh, kw, sh, sw, ceil, cip, div, data):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    x = make_input((n, c, h, w), torch.float64)
    args = ((kh, kw), (sh, sw), (ph, pw), ceil, cip, div)
    try:
        eout = F.avg_pool2d(x, *args)
    except RuntimeError:
        with pytest.raises(ValueError):
            ref.avg_pool2d(x, *args)
        return
    assert_close(ref.avg_pool2d(x, *args), eout)
