"""convrnn local_response_norm (functional, dispatcher ops, module) against
torch.nn.functional and the reference: values, gradients, special values, formats, bad input,
opcheck, compile.

torch's CPU local_response_norm has no float16/bfloat16 kernel for inputs of 4 or more
dims (it goes through avg_pool3d); there the half-precision baseline is torch's float32
result rounded to the half dtype, the best any half kernel can return."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from helpers import (ALL_DTYPES, BAD_DTYPES, COMPILE_BACKEND, FLOAT_DTYPES, HALF_DTYPES, LRN_CONFIGS,
                     assert_half_ok, assert_same_format, cfg_id, dtype_id, forward_backward,
                     grad_output_variants, import_ck, make_input, needs_cuda, num_threads, raises_op_arg,
                     special_input)

ck = import_ck("local_response_norm", "nn", "reference")
OPS = torch.ops.convrnn

# ours vs torch in one dtype: torch sums the squares through avg_pool in the input dtype
LRN_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-12)}


def _lrn(f, *args):
    return lambda t: f(t, *args)


def _torch_half(x, gout, args):
    """torch's own float16/bfloat16 result and gradient, or the float32 ones rounded where
    torch has no half kernel on this device."""
    try:
        return forward_backward(_lrn(F.local_response_norm, *args), x, gout)[:2]
    except (NotImplementedError, RuntimeError):
        out32, gx32, _ = forward_backward(_lrn(F.local_response_norm, *args), x.float(), gout.float())
        return out32.to(x.dtype), gx32.to(x.dtype)


def _check_against_torch(x, args, what=""):
    out, gx, gout = forward_backward(_lrn(ck.local_response_norm, *args), x)
    assert out.shape == x.shape and out.dtype == x.dtype and gx.shape == x.shape
    assert_same_format(out, x, what)
    assert_same_format(gx, x, what + " grad")
    if x.dtype in HALF_DTYPES:
        out32, gx32, _ = forward_backward(_lrn(F.local_response_norm, *args), x.float(), gout.float())
        eout, egx = _torch_half(x, gout, args)
        assert_half_ok(out, eout, out32, what + " values")
        assert_half_ok(gx, egx, gx32, what + " grad")
    else:
        eout, egx, _ = forward_backward(_lrn(F.local_response_norm, *args), x, gout)
        torch.testing.assert_close(out, eout, equal_nan=True, **LRN_TOL[x.dtype], msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(gx, egx, equal_nan=True, **LRN_TOL[x.dtype], msg=lambda m: f"{what} grad: {m}")
    return out, gx, gout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", LRN_CONFIGS, ids=cfg_id)
def test_matches_torch_and_reference(device, cfg, dtype, channels_last):
    shape, *args = cfg
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    x = make_input(shape, dtype, device, channels_last=channels_last) * 3
    out, gx, gout = _check_against_torch(x, args)
    if dtype in FLOAT_DTYPES:
        rout, rgx, _ = forward_backward(_lrn(ck.reference.local_response_norm, *args), x, gout)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out, rout, **tol)
        torch.testing.assert_close(gx, rgx, **tol)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nan_and_inf_propagate(device, dtype, kind):
    for shape in [(2, 7, 4, 3), (2, 9, 5)]:
        x = special_input(kind, shape, dtype, device, seed=5)
        for size in (1, 2, 5):
            out = ck.local_response_norm(x, size, 0.1, 0.75, 1.0)
            eout = F.local_response_norm(x, size, 0.1, 0.75, 1.0)
            assert torch.equal(out.isnan(), eout.isnan()), f"NaN pattern, size {size}"
            torch.testing.assert_close(out, eout, equal_nan=True, **LRN_TOL[dtype])


@pytest.mark.parametrize("cfg", [c for c in LRN_CONFIGS[2:] if math.prod(c[0][1:]) <= 200], ids=cfg_id)
def test_gradcheck(device, cfg):
    shape, *args = cfg
    shape = (1,) + shape[1:]
    x = make_input(shape, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ck.local_response_norm(t, *args), (x,))
    xl = make_input((1, 5, 3, 2), torch.float64, device, channels_last=True).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ck.local_response_norm(t, *args), (xl,))


@given(n=st.integers(0, 2), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       size=st.integers(1, 10), alpha=st.sampled_from([1e-4, 0.01, 0.5, 2.0]),
       beta=st.sampled_from([0.5, 0.75, 1.0, 2.0]), k=st.sampled_from([0.5, 1.0, 2.0]),
       channels_last=st.booleans(), dtype=st.sampled_from(ALL_DTYPES))
def test_random_shapes_and_options(device, n, c, spatial, size, alpha, beta, k, channels_last, dtype):
    shape = (n, c, *spatial)
    x = make_input(shape, dtype, device, channels_last=channels_last and len(shape) == 4) * 2
    _check_against_torch(x, (size, alpha, beta, k), f"random {shape} {(size, alpha, beta, k)}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_is_deterministic(device, channels_last):
    x = make_input((4, 16, 16, 16), torch.float32, device, channels_last=channels_last, seed=11)
    args = (5, 1e-2, 0.75, 1.0)
    with num_threads(2):
        _, g1, gout = forward_backward(_lrn(ck.local_response_norm, *args), x)
        _, g2, _ = forward_backward(_lrn(ck.local_response_norm, *args), x, gout)
        g3 = OPS.local_response_norm_backward(gout, x, *args)
    assert torch.equal(g1, g2) and torch.equal(g1, g3)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded", "channels_last_3d", "3d_transposed"])
def test_non_contiguous_input(device, view):
    base = make_input((2, 10, 7, 6), torch.float32, device, seed=4)
    x = {"transposed": base.transpose(2, 3),
         "sliced": base[:, ::2, 1:, ::2],
         "expanded": base[:1, :, :1].expand(2, 10, 7, 6),
         "channels_last_3d": make_input((2, 6, 3, 4, 5), torch.float32, device).contiguous(
             memory_format=torch.channels_last_3d),
         "3d_transposed": base[:, :, 0].transpose(1, 2).contiguous().transpose(1, 2)}[view]
    assert not x.is_contiguous()
    _check_against_torch(x, (5, 0.1, 0.75, 2.0), view)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_non_contiguous_grad_output(device, channels_last):
    x = make_input((2, 5, 9, 8), torch.float32, device, channels_last=channels_last).requires_grad_()
    out, eout = ck.local_response_norm(x, 3, 0.1), F.local_response_norm(x, 3, 0.1)
    for name, gout in grad_output_variants(out).items():
        (gx,) = torch.autograd.grad(out, x, gout, retain_graph=True)
        (egx,) = torch.autograd.grad(eout, x, gout, retain_graph=True)
        torch.testing.assert_close(gx, egx, **LRN_TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (0, 4, 6), (0, 3, 2, 2, 2)])
def test_empty_batch(device, shape):
    x = make_input(shape, torch.float32, device).requires_grad_()
    out = ck.local_response_norm(x, 5)
    assert out.shape == x.shape and out.dtype == x.dtype
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.shape == x.shape


def test_argument_forms(device):
    x = make_input((2, 6, 4, 5), device=device)
    tol = LRN_TOL[torch.float32]
    torch.testing.assert_close(ck.local_response_norm(x, 3), F.local_response_norm(x, 3), **tol)
    torch.testing.assert_close(ck.local_response_norm(input=x, size=4, alpha=0.5, beta=1, k=2),
                               F.local_response_norm(x, 4, 0.5, 1, 2), **tol)


def test_dispatcher_ops(device):
    x = make_input((2, 6, 4, 5), torch.float64, device)
    args = (3, 0.2, 0.75, 1.5)
    torch.testing.assert_close(OPS.local_response_norm(x, *args), F.local_response_norm(x, *args),
                               **LRN_TOL[torch.float64])
    _, egx, gout = forward_backward(_lrn(F.local_response_norm, *args), x)
    torch.testing.assert_close(OPS.local_response_norm_backward(gout, x, *args), egx, **LRN_TOL[torch.float64])


# ---- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size,arg", [((2, 4, 5), 0, "size"), ((2, 4, 5, 5), -3, "size"),
                                            ((4, 5), 2, "input"), ((5,), 2, "input")])
def test_bad_arguments(device, shape, size, arg):
    x = torch.randn(shape, device=device)
    with raises_op_arg("local_response_norm", arg):
        ck.local_response_norm(x, size)


@pytest.mark.parametrize("size", [2.5, 3.0, True, "3", None], ids=repr)
def test_size_not_an_integer(size):
    """A size that is not an integer raises TypeError naming the op and size, as torch raises
    TypeError (a float would otherwise be truncated); an integer tensor is taken, as by torch."""
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(TypeError):
        F.local_response_norm(x, size)
    with pytest.raises(TypeError, match=r"convrnn\.local_response_norm.*size"):
        ck.local_response_norm(x, size)
    torch.testing.assert_close(ck.local_response_norm(x, torch.tensor(3)), F.local_response_norm(x, 3))


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=dtype_id)
def test_bad_dtype(device, dtype):
    x = torch.ones(1, 4, 3, 3, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.local_response_norm.*input"):
        ck.local_response_norm(x, 2)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.local_response_norm.*input"):
        OPS.local_response_norm_backward(torch.ones(1, 4, 3, 3, device=device), x, 2, 1e-4, 0.75, 1.0)


def test_backward_bad_arguments(device):
    x = make_input((1, 4, 3, 3), device=device)
    with raises_op_arg("local_response_norm", "grad_output"):
        OPS.local_response_norm_backward(torch.ones(1, 4, 3, 2, device=device), x, 2, 1e-4, 0.75, 1.0)
    with raises_op_arg("local_response_norm", "grad_output"):
        OPS.local_response_norm_backward(torch.ones(1, 4, 3, 3, device=device, dtype=torch.float64), x, 2, 1e-4,
                                         0.75, 1.0)
    with raises_op_arg("local_response_norm", "size"):
        OPS.local_response_norm_backward(torch.ones(1, 4, 3, 3, device=device), x, 0, 1e-4, 0.75, 1.0)


@needs_cuda
def test_backward_tensors_on_different_devices():
    x = make_input((1, 4, 3, 3), device="cuda")
    with raises_op_arg("local_response_norm", "grad_output"):
        OPS.local_response_norm_backward(torch.ones(1, 4, 3, 3), x, 2, 1e-4, 0.75, 1.0)


# ---- dispatcher integration: opcheck and torch.compile ------------------------------------

@pytest.mark.parametrize("shape,channels_last", [((2, 6, 4, 3), False), ((2, 6, 4, 3), True), ((2, 5, 7), False)])
def test_opcheck(device, shape, channels_last):
    x = make_input(shape, torch.float32, device, channels_last=channels_last)
    args = (3, 0.1, 0.75, 1.0)
    torch.library.opcheck(OPS.local_response_norm.default, (x.requires_grad_(), *args))
    gout = make_input(shape, torch.float32, device, channels_last=channels_last, seed=2)
    torch.library.opcheck(OPS.local_response_norm_backward.default, (gout, x.detach(), *args))


def test_torch_compile(device):
    torch._dynamo.reset()
    norm = ck.nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)

    def model(t):
        return ck.local_response_norm(norm(t) * 3, 2)

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x = make_input((2, 6, 5, 4), torch.float32, device)
    out, gx, gout = forward_backward(compiled, x)
    eout, egx, _ = forward_backward(model, x, gout)
    torch.testing.assert_close(out, eout, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx, egx, rtol=1e-6, atol=1e-7)


# ---- module --------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs", [((5,), {}), ((3, 0.1, 0.5, 2.0), {}), ((2,), dict(alpha=1e-3, k=1.5))])
def test_module_matches_torch_nn(device, args, kwargs):
    ours, theirs = ck.nn.LocalResponseNorm(*args, **kwargs), torch.nn.LocalResponseNorm(*args, **kwargs)
    assert isinstance(ours, torch.nn.LocalResponseNorm)
    assert repr(ours) == repr(theirs)
    for name in ("size", "alpha", "beta", "k"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict() == {} and list(ours.parameters()) == []
    x = make_input((2, 6, 4, 5), device=device)
    torch.testing.assert_close(ours(x), theirs(x), **LRN_TOL[torch.float32])


def test_module_signature():
    assert inspect.signature(ck.nn.LocalResponseNorm) == inspect.signature(torch.nn.LocalResponseNorm)
