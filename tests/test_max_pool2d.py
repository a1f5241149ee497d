"""convrnn max_pool2d (functional, dispatcher ops, module) against torch.nn.functional and the
reference: values, indices, gradients, special values, formats, bad input, opcheck, compile."""
import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from helpers import (ALL_DTYPES, BAD_DTYPES, COMPILE_BACKEND, FLOAT_DTYPES, HALF_DTYPES, MAX_CONFIGS, ROOT,
                     SPECIAL_KINDS, assert_close, assert_half_ok, assert_same_format, cfg_id, dtype_id,
                     forward_backward, grad_output_variants, import_ck, make_input, needs_cuda, num_threads,
                     raises_op_arg, special_input)

ck = import_ck("max_pool2d", "nn", "reference")
OPS = torch.ops.convrnn


def _pool(f, k, s, p, d, ceil):
    return lambda t: f(t, k, s, p, d, ceil, return_indices=True)


def _check_against_torch(x, cfg_args, what=""):
    """Ours vs torch (same dtype, same device) and vs the reference: values and indices exact,
    gradients close (float32/64) or within the half-precision rule."""
    (out, idx), gx, gout = forward_backward(_pool(ck.max_pool2d, *cfg_args), x)
    (eout, eidx), egx, _ = forward_backward(_pool(F.max_pool2d, *cfg_args), x, gout)
    torch.testing.assert_close(out, eout, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} values: {m}")
    rout, ridx = ck.reference.max_pool2d(x.detach(), *cfg_args, return_indices=True)
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} vs ref: {m}")
    assert idx.dtype == torch.int64 and torch.equal(idx, ridx), f"{what}: indices differ from the reference's"
    # torch's CUDA channels_last kernel starts its argmax at index 0, not at the first
    # in-image tap, so windows of all -inf are judged by the reference alone there
    judged = (out != -float("inf")) if x.is_cuda else torch.ones_like(idx, dtype=torch.bool)
    assert torch.equal(idx[judged], eidx[judged]), f"{what}: indices differ from torch's"
    assert_same_format(out, x, what)
    assert_same_format(idx, x, what + " indices")
    assert_same_format(gx, x, what + " grad")
    if x.is_cuda and not bool(judged.all()):
        _, rgx, _ = forward_backward(_pool(ck.reference.max_pool2d, *cfg_args), x.double(), gout.double())
        rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 2 * torch.finfo(x.dtype).eps)
        atol = rtol * max(1.0, float(rgx.abs().max()))
        torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=atol, msg=lambda m: f"{what} grad vs ref: {m}")
    elif x.dtype in HALF_DTYPES:
        _, gx32, _ = forward_backward(_pool(F.max_pool2d, *cfg_args), x.float(), gout.float())
        assert_half_ok(gx, egx, gx32, what + " grad")
    else:
        assert_close(gx, egx, what + " grad")
    return out, idx, gx, gout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", MAX_CONFIGS, ids=cfg_id)
def test_matches_torch_and_reference(device, cfg, dtype, channels_last):
    shape, *args = cfg
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    x = make_input(shape, dtype, device, channels_last=channels_last)
    out, idx, gx, gout = _check_against_torch(x, args)
    assert torch.equal(ck.max_pool2d(x, *args), out)          # return_indices=False path
    if dtype in FLOAT_DTYPES:
        _, rgx, _ = forward_backward(lambda t: ck.reference.max_pool2d(t, *args), x, gout)
        assert_close(gx, rgx, "grad vs reference")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", [MAX_CONFIGS[i] for i in (0, 2, 6, 7, 10, 13, 15)], ids=cfg_id)
def test_ties_nan_and_inf(device, cfg, dtype, kind):
    """Ties pick the first maximum, a NaN wins (the last one), all -inf windows give their
    first in-image tap, as torch on the same device."""
    shape, *args = cfg
    for channels_last in (False, True):
        x = special_input(kind, shape, dtype, device, seed=7)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _check_against_torch(x, args, f"{kind} channels_last={channels_last}")


_NO_TAP_SCRIPT = r"""
import sys, torch, convrnn_kernels as ck
device, = sys.argv[1:]
for dtype in (torch.float32, torch.float16):
    for channels_last in (False, True):
        x = torch.arange(8.0, device=device).reshape(1, 2, 2, 2).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        out = ck.max_pool2d(x, (2, 1), 1, (1, 0), (3, 1))
        assert out.shape == (1, 2, 1, 2) and bool((out == -float("inf")).all()), out
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert torch.equal(gx, torch.zeros_like(x)), (dtype, channels_last, gx)
print("ok")
"""


def test_window_without_image_tap(device):
    """k=2, dilation 3, padding 1 on H=2: the first window's taps (-1 and 2) all miss the
    image.  Its value is -inf and no gradient flows anywhere; torch's CPU backward writes
    through its out-of-plane index here, so this is judged against the definition, and in a
    subprocess, because an out-of-bounds write can abort the interpreter."""
    res = subprocess.run([sys.executable, "-c", _NO_TAP_SCRIPT, device], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-2000:]}"


@pytest.mark.parametrize("cfg", [((2, 3, 8, 8), 2, 2, 0), ((2, 3, 9, 7), 3, 2, 1), ((3, 8, 8), 3, 1, 1)], ids=cfg_id)
def test_indices_work_with_max_unpool2d(device, cfg):
    shape, k, s, p = cfg
    x = make_input(shape, device=device, distinct=True)
    out, idx = ck.max_pool2d(x, k, s, p, return_indices=True)
    eout, eidx = F.max_pool2d(x, k, s, p, return_indices=True)
    size = x.shape[-2:]
    assert torch.equal(F.max_unpool2d(out, idx, k, s, p, output_size=size),
                       F.max_unpool2d(eout, eidx, k, s, p, output_size=size))


@pytest.mark.parametrize("cfg", [MAX_CONFIGS[i] for i in (2, 3, 6, 7, 8, 9)], ids=cfg_id)
def test_gradcheck(device, cfg):
    shape, k, s, p, d, ceil = cfg
    shape = shape[:-2] + tuple(min(n, 7) for n in shape[-2:])  # tiny
    shape = (1,) * (len(shape) - 3) + shape[-3:]
    x = make_input(shape, torch.float64, device, distinct=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ck.max_pool2d(t, k, s, p, d, ceil), (x,), eps=1e-6, atol=1e-6)
    xl = make_input((1, 2, 5, 6), torch.float64, device, channels_last=True, distinct=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ck.max_pool2d(t, 3, 2, 1), (xl,), eps=1e-6, atol=1e-6)


@given(n=st.integers(0, 2), c=st.integers(1, 4), h=st.integers(1, 11), w=st.integers(1, 11),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 3), ceil=st.booleans(), channels_last=st.booleans(),
       dtype=st.sampled_from(ALL_DTYPES), ties=st.booleans(), data=st.data())
def test_random_shapes_and_options(device, n, c, h, w, kh, kw, sh, sw, dh, dw, ceil, channels_last, dtype,
                                   ties, data):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil)
    x = special_input("ties", (n, c, h, w), dtype, device) if ties else make_input((n, c, h, w), dtype, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        eout, eidx = F.max_pool2d(x, *args, return_indices=True)
    except RuntimeError:  # torch rejects it (window too large): so must we
        with pytest.raises((RuntimeError, ValueError), match="max_pool2d"):
            ck.max_pool2d(x, *args)
        return
    if eidx.numel() and int(eidx.max()) >= h * w:
        return  # a window with no tap in the image: see test_window_without_image_tap
    _check_against_torch(x, args, f"random {args}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_is_deterministic(device, channels_last):
    x = special_input("ties", (4, 8, 24, 24), torch.float32, device, seed=11)  # overlapping windows, ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with num_threads(2):
        _, g1, gout = forward_backward(lambda t: ck.max_pool2d(t, 3, 1, 1), x)
        _, g2, _ = forward_backward(lambda t: ck.max_pool2d(t, 3, 1, 1), x, gout)
        args = ([3, 3], [1, 1], [1, 1], [1, 1], False)
        g3 = OPS.max_pool2d_backward(gout, x, saved_argmax(x, args), *args)
    assert torch.equal(g1, g2) and torch.equal(g1, g3)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input(device, view):
    base = make_input((2, 6, 11, 10), torch.float32, device, seed=4)
    x = {"transposed": base.transpose(2, 3),
         "sliced": base[:, ::2, 1:, ::2],
         "expanded": base[:1, :1].expand(2, 3, 11, 10)}[view]
    assert not x.is_contiguous()
    _check_against_torch(x, ((3, 2), (2, 1), (1, 1), 1, True), view)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_non_contiguous_grad_output(device, channels_last):
    x = make_input((2, 5, 9, 8), torch.float32, device, channels_last=channels_last).requires_grad_()
    out, eout = ck.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1)
    for name, gout in grad_output_variants(out).items():
        (gx,) = torch.autograd.grad(out, x, gout, retain_graph=True)
        (egx,) = torch.autograd.grad(eout, x, gout, retain_graph=True)
        assert_close(gx, egx, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(device, channels_last):
    x = make_input((0, 3, 8, 8), torch.float32, device, channels_last=channels_last)
    x.requires_grad_()
    out, idx = ck.max_pool2d(x, 3, 2, 1, return_indices=True)
    eout, eidx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert out.shape == eout.shape and idx.shape == eidx.shape and out.dtype == x.dtype
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.shape == x.shape


def test_argument_forms(device):
    """int, 1- and 2-sequences, stride None or () all mean what they mean for F.max_pool2d."""
    x = make_input((2, 3, 9, 8), device=device)
    expected = F.max_pool2d(x, 3, 2, 1)
    for k in (3, (3,), [3, 3], (3, 3)):
        for s in (2, (2,), [2, 2]):
            assert torch.equal(ck.max_pool2d(x, k, s, (1, 1)), expected)
    assert torch.equal(ck.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert torch.equal(ck.max_pool2d(x, (2, 3), None), F.max_pool2d(x, (2, 3)))
    assert torch.equal(ck.max_pool2d(x, kernel_size=2, stride=()), F.max_pool2d(x, 2))
    out = ck.max_pool2d(input=x, kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True, return_indices=False)
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1, ceil_mode=True))


def test_dispatcher_ops(device):
    x = make_input((2, 3, 9, 8), torch.float64, device)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    out, idx, argmax = OPS.max_pool2d(x, *args, True, True)
    eout, eidx = F.max_pool2d(x, 3, 2, 1, 1, True, return_indices=True)
    assert torch.equal(out, eout) and torch.equal(idx, eidx)
    assert argmax.dtype == torch.uint8 and argmax.shape == out.shape
    out2, empty, empty2 = OPS.max_pool2d(x, *args, False, False)
    assert torch.equal(out2, eout) and empty.numel() == 0 and empty.dtype == torch.int64 and empty2.numel() == 0
    _, egx, gout = forward_backward(lambda t: F.max_pool2d(t, 3, 2, 1, 1, True), x)
    assert_close(OPS.max_pool2d_backward(gout, x, argmax, *args), egx)
    with raises_op_arg("max_pool2d_backward", "argmax"):  # the forward did not save it
        OPS.max_pool2d_backward(gout, x, empty2, *args)


def saved_argmax(x, args):
    """The argmax the forward saves for the backward (max_pool2d with save_argmax=True)."""
    return OPS.max_pool2d(x.detach(), *args, False, True)[2]


# ---- bad input -------------------------------------------------------------------------

BAD_ARGS = [  # (input shape, kwargs, argument named in the message)
    ((1, 1, 4, 4), dict(kernel_size=0), "kernel_size"),
    ((1, 1, 4, 4), dict(kernel_size=(0, 2)), "kernel_size"),
    ((1, 1, 4, 4), dict(kernel_size=(2, -1)), "kernel_size"),
    ((1, 1, 4, 4), dict(kernel_size=2, stride=0), "stride"),
    ((1, 1, 4, 4), dict(kernel_size=2, stride=(1, -1)), "stride"),
    ((1, 1, 4, 4), dict(kernel_size=2, dilation=0), "dilation"),
    ((1, 1, 4, 4), dict(kernel_size=2, dilation=(1, -2)), "dilation"),
    ((1, 1, 4, 4), dict(kernel_size=2, padding=2), "padding"),
    ((1, 1, 8, 8), dict(kernel_size=3, padding=(0, 3)), "padding"),
    ((1, 1, 4, 4), dict(kernel_size=2, padding=-1), "padding"),
    ((1, 1, 2, 2), dict(kernel_size=3), "kernel_size"),                     # window larger than the input
    ((1, 1, 2, 6), dict(kernel_size=(2, 2), dilation=(2, 1)), "kernel_size"),  # dilated window too large
    ((4, 4), dict(kernel_size=2), "input"),
    ((1, 1, 1, 4, 4), dict(kernel_size=2), "input"),
    ((2, 0, 4, 4), dict(kernel_size=2), "input"),                            # empty channels (torch rejects too)
]


@pytest.mark.parametrize("shape,kwargs,arg", BAD_ARGS, ids=[f"{a}-{i}" for i, (_, _, a) in enumerate(BAD_ARGS)])
def test_bad_arguments(device, shape, kwargs, arg):
    x = torch.randn(shape, device=device)
    with raises_op_arg("max_pool2d", arg):
        ck.max_pool2d(x, **kwargs)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=dtype_id)
def test_bad_dtype(device, dtype):
    x = torch.ones(1, 1, 4, 4, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.max_pool2d.*input"):
        ck.max_pool2d(x, 2)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.max_pool2d.*input"):
        OPS.max_pool2d_backward(torch.ones(1, 1, 2, 2, device=device), x, torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
                                [2, 2], [2, 2], [0, 0], [1, 1], False)


def test_backward_bad_grad_output(device):
    x = make_input((1, 2, 6, 6), device=device)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    argmax = saved_argmax(x, args)
    with raises_op_arg("max_pool2d", "grad_output"):
        OPS.max_pool2d_backward(torch.ones(1, 2, 3, 2, device=device), x, argmax, *args)
    with raises_op_arg("max_pool2d", "grad_output"):
        OPS.max_pool2d_backward(torch.ones(1, 2, 3, 3, device=device, dtype=torch.float64), x, argmax, *args)
    with raises_op_arg("max_pool2d", "argmax"):
        OPS.max_pool2d_backward(torch.ones(1, 2, 3, 3, device=device), x, argmax.int(), *args)


@needs_cuda
def test_backward_tensors_on_different_devices():
    x = make_input((1, 2, 6, 6), device="cuda")
    with raises_op_arg("max_pool2d", "grad_output"):
        args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
        OPS.max_pool2d_backward(torch.ones(1, 2, 3, 3), x, saved_argmax(x, args), *args)


# ---- dispatcher integration: opcheck and torch.compile ------------------------------------

@pytest.mark.parametrize("channels_last,return_indices", [(False, True), (True, False)])
def test_opcheck(device, channels_last, return_indices):
    x = make_input((2, 3, 7, 6), torch.float32, device, channels_last=channels_last, distinct=True)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(OPS.max_pool2d.default, (x.requires_grad_(), *args, return_indices, True))
    out, _, argmax = OPS.max_pool2d(x.detach(), *args, False, True)
    gout = make_input(tuple(out.shape), torch.float32, device, channels_last=channels_last, seed=2)
    torch.library.opcheck(OPS.max_pool2d_backward.default, (gout, x.detach(), argmax, *args))


def test_torch_compile(device):
    torch._dynamo.reset()
    pool = ck.nn.MaxPool2d(3, stride=2, padding=1)

    def model(t):
        return ck.max_pool2d(pool(t) * 2, (2, 1), ceil_mode=True, return_indices=True)

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x = make_input((2, 3, 9, 8), torch.float32, device, distinct=True)
    (out, idx), gx, gout = forward_backward(compiled, x)
    (eout, eidx), egx, _ = forward_backward(model, x, gout)
    assert torch.equal(out, eout) and torch.equal(idx, eidx)
    assert_close(gx, egx, "compiled grad")


# ---- module --------------------------------------------------------------------------------

MODULE_ARGS = [((3,), {}), ((3, 2, 1), {}), ((2,), dict(stride=1, dilation=2, ceil_mode=True)),
               (((3, 2),), dict(stride=(2, 1), padding=(1, 0), return_indices=True))]


@pytest.mark.parametrize("args,kwargs", MODULE_ARGS)
def test_module_matches_torch_nn(device, args, kwargs):
    ours, theirs = ck.nn.MaxPool2d(*args, **kwargs), torch.nn.MaxPool2d(*args, **kwargs)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert repr(ours) == repr(theirs)
    for name in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict() == {} and list(ours.parameters()) == []
    x = make_input((2, 3, 9, 8), device=device)
    got, expected = ours(x), theirs(x)
    if isinstance(expected, tuple):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    else:
        assert torch.equal(got, expected)


def test_module_signature():
    assert inspect.signature(ck.nn.MaxPool2d) == inspect.signature(torch.nn.MaxPool2d)
    m = ck.nn.MaxPool2d(kernel_size=2, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False)
    assert m.stride == torch.nn.MaxPool2d(2).stride


# Rows of 16+ interior outputs take the CPU's chunked AVX-512 stride-2 path (where the CPU
# has AVX-512) and the long vectorised loops; the small shapes above mostly do not.
WIDE = [((9, 112), 2, 2, 0, 1, False), ((7, 55), 3, 2, 0, 1, False), ((8, 112), 3, 2, 1, 1, False),
        ((6, 71), 3, 2, 1, 1, True), ((5, 80), (2, 3), 2, (1, 1), (1, 2), False), ((5, 40), 3, (1, 2), 1, 1, False)]


@pytest.mark.parametrize("hw,k,s,p,d,ceil", WIDE)
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_wide_rows_match_torch(device, hw, k, s, p, d, ceil, kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, *hw, generator=g)
    if kind == "ties":
        x = torch.randint(0, 3, (2, 3, *hw), generator=g).float()
    elif kind == "nan":
        x[torch.rand(x.shape, generator=g) < 0.05] = float("nan")
    x = x.to(device).requires_grad_()
    out, idx = ck.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    eout, eidx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    assert torch.equal(idx, eidx)
    assert_close(out, eout, "values")
    gout = torch.randn(out.shape, generator=g).to(device)
    assert_close(torch.autograd.grad(out, x, gout)[0], torch.autograd.grad(eout, x, gout)[0])


# (shape, kernel, stride, padding, ceil_mode, channels_last): rows CUDA round 4 takes (NCHW 2x2/2
# with W % 8 == 0 and every window inside, read by 16-byte pieces; channels_last with C % 4 == 0,
# 4 channels an item; round 5: C % 8 == 0 in the 2-byte types, 8 channels an item), and ones it
# declines (odd H with ceil_mode, W = 20, C = 6).
ROUND4 = [((2, 3, 10, 24), 2, 2, 0, False, False), ((1, 2, 7, 16), 2, 2, 0, False, False),
          ((1, 2, 7, 16), 2, 2, 0, True, False), ((2, 2, 6, 20), 2, 2, 0, False, False),
          ((2, 8, 10, 12), 2, 2, 0, False, True), ((2, 8, 13, 13), 3, 2, 0, False, True),
          ((1, 12, 9, 9), 3, 2, 1, True, True), ((2, 4, 7, 7), 3, 1, 1, False, True),
          ((2, 6, 8, 8), 2, 2, 0, False, True), ((2, 16, 8, 6), 2, 2, 0, False, True),
          ((1, 16, 9, 11), 3, 1, 1, True, True), ((1, 24, 11, 9), 3, 2, 1, False, True)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", ROUND4, ids=cfg_id)
def test_round4_forward_forms(device, dtype, cfg):
    """The three forward forms (values only, values and indices, the training forward that saves
    the argmax) on round 4's rows: ties, NaN and -inf included, values, indices and gradients
    exact against torch."""
    shape, k, s, p, ceil, channels_last = cfg
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 3, shape, generator=g).to(torch.float64)
    x[torch.rand(shape, generator=g) < 0.05] = float("nan")
    # -inf in odd rows only: no window is all -inf (whose index torch's CUDA kernel picks
    # differently from its CPU one)
    odd = x[..., 1::2, :]
    odd[torch.rand(odd.shape, generator=g) < 0.1] = -float("inf")
    x = x.to(dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ck.max_pool2d(x, k, s, p, ceil_mode=ceil), F.max_pool2d(x, k, s, p, ceil_mode=ceil),
                                   rtol=0, atol=0, equal_nan=True)
    xg = x.clone().requires_grad_()
    out, idx = ck.max_pool2d(xg, k, s, p, ceil_mode=ceil, return_indices=True)
    eout, eidx = F.max_pool2d(xg, k, s, p, ceil_mode=ceil, return_indices=True)
    torch.testing.assert_close(out, eout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, eidx)
    assert_same_format(out, x, "values")
    # integer gradients: sums over overlapping windows are exact in every dtype and order
    gout = torch.randint(-4, 4, out.shape, generator=g).to(dtype).to(device)
    assert torch.equal(torch.autograd.grad(out, xg, gout)[0], torch.autograd.grad(eout, xg, gout)[0])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [1, 2, 4, 8])
@pytest.mark.parametrize("cfg", [((2, 16, 8, 8), 2, 2, 0), ((1, 16, 9, 9), 3, 2, 1)], ids=cfg_id)
def test_misaligned_channels_last_input(device, dtype, offset, cfg):
    """A channels_last input whose data starts `offset` elements into its storage (not aligned
    to the 8- or 16-byte accesses of the multi-channel kernels): the same values, indices and
    gradients as torch's and as the same input aligned."""
    shape, k, s, p = cfg
    g = torch.Generator().manual_seed(offset)
    base = torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    buf = torch.empty(base.numel() + offset, dtype=dtype, device=device)
    x = buf[offset:].as_strided(base.shape, base.stride())
    x.copy_(base)
    assert x.storage_offset() == offset and x.is_contiguous(memory_format=torch.channels_last)
    for t in (x, base):
        t.requires_grad_()
    out, idx = ck.max_pool2d(x, k, s, p, return_indices=True)
    eout, eidx = F.max_pool2d(x, k, s, p, return_indices=True)
    aout = ck.max_pool2d(base, k, s, p)
    torch.testing.assert_close(out, eout, rtol=0, atol=0)
    torch.testing.assert_close(out, aout, rtol=0, atol=0)
    assert torch.equal(idx, eidx)
    gout = torch.randint(-4, 4, out.shape, generator=g).to(dtype).to(device)
    assert torch.equal(torch.autograd.grad(out, x, gout)[0], torch.autograd.grad(eout, x, gout)[0])
    with torch.no_grad():
        torch.testing.assert_close(ck.max_pool2d(x, k, s, p), eout, rtol=0, atol=0)
