"""convrnn avg_pool2d (functional, dispatcher ops, module) against torch.nn.functional and the
reference: values, divisors, gradients, special values, formats, bad input, opcheck, compile."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from helpers import (ALL_DTYPES, AVG_GEOMETRIES, AVG_OPTIONS, BAD_DTYPES, COMPILE_BACKEND, FLOAT_DTYPES,
                     HALF_DTYPES, assert_close, assert_half_ok, assert_same_format, cfg_id, dtype_id,
                     forward_backward, grad_output_variants, import_ck, make_input, needs_cuda, num_threads,
                     raises_op_arg, special_input)

ck = import_ck("avg_pool2d", "nn", "reference")
OPS = torch.ops.convrnn


def _pool(f, *args):
    return lambda t: f(t, *args)


def _torch_avg_pool2d(x, *args):
    """F.avg_pool2d, run on an NCHW copy for CUDA channels_last inputs: there torch's backward
    with padding > 0 returns wrong gradients (pytorch/pytorch#188344, fixed by #188345, still
    in torch 2.11); the copy's gradient flows back to x."""
    if x.is_cuda and x.dim() == 4 and not x.is_contiguous():
        x = x.contiguous()
    return F.avg_pool2d(x, *args)


def _check_against_torch(x, args, what=""):
    """Ours vs torch on the same device: close in float32/64, the half-precision rule in
    float16/bfloat16 (forward and gradient); NaN where torch has NaN."""
    out, gx, gout = forward_backward(_pool(ck.avg_pool2d, *args), x)
    eout, egx, _ = forward_backward(_pool(_torch_avg_pool2d, *args), x, gout)
    assert_same_format(out, x, what)
    assert_same_format(gx, x, what + " grad")
    if x.dtype in HALF_DTYPES:
        out32, gx32, _ = forward_backward(_pool(F.avg_pool2d, *args), x.float(), gout.float())
        assert_half_ok(out, eout, out32, what + " values")
        assert_half_ok(gx, egx, gx32, what + " grad")
    else:
        assert_close(out, eout, what + " values")
        assert_close(gx, egx, what + " grad")
    return out, gx, gout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", AVG_OPTIONS, ids=cfg_id)
@pytest.mark.parametrize("geo", AVG_GEOMETRIES, ids=cfg_id)
def test_matches_torch_and_reference(device, geo, opts, dtype, channels_last):
    shape, *geo_args = geo
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    args = (*geo_args, *opts)
    x = make_input(shape, dtype, device, channels_last=channels_last)
    out, gx, gout = _check_against_torch(x, args)
    if dtype in FLOAT_DTYPES:
        rout, rgx, _ = forward_backward(_pool(ck.reference.avg_pool2d, *args), x, gout)
        assert_close(out, rout, "values vs reference")
        assert_close(gx, rgx, "grad vs reference")


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_nan_and_inf_propagate(device, dtype, kind):
    for channels_last in (False, True):
        x = special_input(kind, (2, 3, 9, 9), dtype, device, seed=5)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for opts in AVG_OPTIONS[:4]:
            out = ck.avg_pool2d(x, 3, 2, 1, *opts)
            eout = F.avg_pool2d(x, 3, 2, 1, *opts)
            assert torch.equal(out.isnan(), eout.isnan()), f"NaN pattern {opts}"
            assert torch.equal(out.isinf(), eout.isinf()), f"inf pattern {opts}"
            if dtype in FLOAT_DTYPES:
                assert_close(out, eout, f"{kind} {opts}")


@pytest.mark.parametrize("opts", AVG_OPTIONS, ids=cfg_id)
def test_gradcheck(device, opts):
    for shape, k, s, p in [((1, 2, 5, 6), 3, 2, 1), ((2, 4, 5), (2, 3), (1, 2), (1, 1)), ((1, 1, 4, 4), 4, 1, 2)]:
        x = make_input(shape, torch.float64, device).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ck.avg_pool2d(t, k, s, p, *opts), (x,))
    xl = make_input((1, 3, 5, 4), torch.float64, device, channels_last=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ck.avg_pool2d(t, 2, 1, 1, *opts), (xl,))


@given(n=st.integers(0, 2), c=st.integers(1, 4), h=st.integers(1, 11), w=st.integers(1, 11),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ceil=st.booleans(), cip=st.booleans(), div=st.sampled_from([None, None, 1, 3, -4]),
       channels_last=st.booleans(), dtype=st.sampled_from(ALL_DTYPES), data=st.data())
def test_random_shapes_and_options(device, n, c, h, w, kh, kw, sh, sw, ceil, cip, div, channels_last, dtype,
                                   data):
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    args = ((kh, kw), (sh, sw), (ph, pw), ceil, cip, div)
    x = make_input((n, c, h, w), dtype, device, channels_last=channels_last)
    try:
        F.avg_pool2d(x, *args)
    except RuntimeError:  # torch rejects it (window too large): so must we
        with pytest.raises((RuntimeError, ValueError), match="avg_pool2d"):
            ck.avg_pool2d(x, *args)
        return
    _check_against_torch(x, args, f"random {args}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_is_deterministic(device, channels_last):
    x = make_input((4, 8, 24, 24), torch.float32, device, channels_last=channels_last, seed=11)
    args = (3, 1, 1, True, False, None)   # overlapping windows: each input gathers 9 terms
    with num_threads(2):
        _, g1, gout = forward_backward(_pool(ck.avg_pool2d, *args), x)
        _, g2, _ = forward_backward(_pool(ck.avg_pool2d, *args), x, gout)
        g3 = OPS.avg_pool2d_backward(gout, x, [3, 3], [1, 1], [1, 1], True, False, None)
    assert torch.equal(g1, g2) and torch.equal(g1, g3)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input(device, view):
    base = make_input((2, 6, 11, 10), torch.float32, device, seed=4)
    x = {"transposed": base.transpose(2, 3),
         "sliced": base[:, ::2, 1:, ::2],
         "expanded": base[:1, :1].expand(2, 3, 11, 10)}[view]
    assert not x.is_contiguous()
    _check_against_torch(x, ((3, 2), (2, 1), (1, 1), True, False, None), view)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_non_contiguous_grad_output(device, channels_last):
    x = make_input((2, 5, 9, 8), torch.float32, device, channels_last=channels_last).requires_grad_()
    out, eout = ck.avg_pool2d(x, 3, 2, 1, True, False), _torch_avg_pool2d(x, 3, 2, 1, True, False)
    for name, gout in grad_output_variants(out).items():
        (gx,) = torch.autograd.grad(out, x, gout, retain_graph=True)
        (egx,) = torch.autograd.grad(eout, x, gout, retain_graph=True)
        assert_close(gx, egx, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(device, channels_last):
    x = make_input((0, 3, 8, 8), torch.float32, device, channels_last=channels_last).requires_grad_()
    out = ck.avg_pool2d(x, 3, 2, 1)
    assert out.shape == F.avg_pool2d(x, 3, 2, 1).shape and out.dtype == x.dtype
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.shape == x.shape


def test_argument_forms(device):
    x = make_input((2, 3, 9, 8), device=device)
    expected = F.avg_pool2d(x, 3, 2, 1)
    for k in (3, (3,), [3, 3], (3, 3)):
        for s in (2, (2,), [2, 2]):
            assert_close(ck.avg_pool2d(x, k, s, (1, 1)), expected)
    assert_close(ck.avg_pool2d(x, 2), F.avg_pool2d(x, 2))
    assert_close(ck.avg_pool2d(x, (2, 3), None), F.avg_pool2d(x, (2, 3)))
    assert_close(ck.avg_pool2d(x, kernel_size=2, stride=()), F.avg_pool2d(x, 2))
    out = ck.avg_pool2d(input=x, kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                        divisor_override=None)
    assert_close(out, F.avg_pool2d(x, 3, 2, 1, True, False))


def test_dispatcher_ops(device):
    x = make_input((2, 3, 9, 8), torch.float64, device)
    args = ([3, 3], [2, 2], [1, 1], True, False, None)
    assert_close(OPS.avg_pool2d(x, *args), F.avg_pool2d(x, 3, 2, 1, True, False))
    assert_close(OPS.avg_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, 4),
                 F.avg_pool2d(x, 3, 2, 1, divisor_override=4))
    _, egx, gout = forward_backward(lambda t: F.avg_pool2d(t, 3, 2, 1, True, False), x)
    assert_close(OPS.avg_pool2d_backward(gout, x, *args), egx)


# ---- bad input -------------------------------------------------------------------------

BAD_ARGS = [  # (input shape, kwargs, argument named in the message)
    ((1, 1, 4, 4), dict(kernel_size=0), "kernel_size"),
    ((1, 1, 4, 4), dict(kernel_size=(2, -1)), "kernel_size"),
    ((1, 1, 4, 4), dict(kernel_size=2, stride=0), "stride"),
    ((1, 1, 4, 4), dict(kernel_size=2, stride=(-1, 1)), "stride"),
    ((1, 1, 4, 4), dict(kernel_size=2, padding=2), "padding"),
    ((1, 1, 8, 8), dict(kernel_size=3, padding=(2, 0)), "padding"),
    ((1, 1, 4, 4), dict(kernel_size=2, padding=(0, -1)), "padding"),
    ((1, 1, 2, 2), dict(kernel_size=3), "kernel_size"),        # window larger than the input
    ((4, 4), dict(kernel_size=2), "input"),
    ((1, 1, 1, 4, 4), dict(kernel_size=2), "input"),
    ((1, 1, 4, 4), dict(kernel_size=2, divisor_override=0), "divisor_override"),
]


@pytest.mark.parametrize("shape,kwargs,arg", BAD_ARGS, ids=[f"{a}-{i}" for i, (_, _, a) in enumerate(BAD_ARGS)])
def test_bad_arguments(device, shape, kwargs, arg):
    x = torch.randn(shape, device=device)
    with raises_op_arg("avg_pool2d", arg):
        ck.avg_pool2d(x, **kwargs)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=dtype_id)
def test_bad_dtype(device, dtype):
    x = torch.ones(1, 1, 4, 4, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.avg_pool2d.*input"):
        ck.avg_pool2d(x, 2)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.avg_pool2d.*input"):
        OPS.avg_pool2d_backward(torch.ones(1, 1, 2, 2, device=device), x, [2, 2], [2, 2], [0, 0], False, True, None)


def test_backward_bad_arguments(device):
    x = make_input((1, 2, 6, 6), device=device)
    args = ([2, 2], [2, 2], [0, 0], False, True, None)
    with raises_op_arg("avg_pool2d", "grad_output"):
        OPS.avg_pool2d_backward(torch.ones(1, 2, 3, 2, device=device), x, *args)
    with raises_op_arg("avg_pool2d", "grad_output"):
        OPS.avg_pool2d_backward(torch.ones(1, 2, 3, 3, device=device, dtype=torch.float64), x, *args)
    with raises_op_arg("avg_pool2d", "divisor_override"):
        OPS.avg_pool2d_backward(torch.ones(1, 2, 3, 3, device=device), x, [2, 2], [2, 2], [0, 0], False, True, 0)


@needs_cuda
def test_backward_tensors_on_different_devices():
    x = make_input((1, 2, 6, 6), device="cuda")
    with raises_op_arg("avg_pool2d", "grad_output"):
        OPS.avg_pool2d_backward(torch.ones(1, 2, 3, 3), x, [2, 2], [2, 2], [0, 0], False, True, None)


# ---- dispatcher integration: opcheck and torch.compile ------------------------------------

@pytest.mark.parametrize("channels_last,opts", [(False, (True, False, None)), (True, (False, True, 3))])
def test_opcheck(device, channels_last, opts):
    x = make_input((2, 3, 7, 6), torch.float32, device, channels_last=channels_last)
    args = ([3, 3], [2, 2], [1, 1], *opts)
    torch.library.opcheck(OPS.avg_pool2d.default, (x.requires_grad_(), *args))
    out = OPS.avg_pool2d(x.detach(), *args)
    gout = make_input(tuple(out.shape), torch.float32, device, channels_last=channels_last, seed=2)
    torch.library.opcheck(OPS.avg_pool2d_backward.default, (gout, x.detach(), *args))


def test_torch_compile(device):
    torch._dynamo.reset()
    pool = ck.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def model(t):
        return ck.avg_pool2d(pool(t).relu(), (2, 1), ceil_mode=True, divisor_override=3)

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x = make_input((2, 3, 9, 8), torch.float32, device)
    out, gx, gout = forward_backward(compiled, x)
    eout, egx, _ = forward_backward(model, x, gout)
    assert_close(out, eout, "compiled values")
    assert_close(gx, egx, "compiled grad")


# ---- module --------------------------------------------------------------------------------

MODULE_ARGS = [((3,), {}), ((3, 2, 1), {}), ((2,), dict(stride=1, ceil_mode=True, count_include_pad=False)),
               (((3, 2), (2, 1), (1, 0), True, True, 4), {})]


@pytest.mark.parametrize("args,kwargs", MODULE_ARGS)
def test_module_matches_torch_nn(device, args, kwargs):
    ours, theirs = ck.nn.AvgPool2d(*args, **kwargs), torch.nn.AvgPool2d(*args, **kwargs)
    assert isinstance(ours, torch.nn.AvgPool2d)
    assert repr(ours) == repr(theirs)
    for name in ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict() == {} and list(ours.parameters()) == []
    x = make_input((2, 3, 9, 8), device=device)
    assert_close(ours(x), theirs(x))


def test_module_signature():
    assert inspect.signature(ck.nn.AvgPool2d) == inspect.signature(torch.nn.AvgPool2d)
