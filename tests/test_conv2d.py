"""convrnn conv2d (functional, dispatcher ops, module) against torch.nn.functional.conv2d and
the reference: values and the three gradients over a grid of the seed's layer kinds, padding
strings, formats, dtypes, non-contiguous and empty inputs, determinism, output_mask, bad
input, opcheck, compile, and nn.Conv2d with every padding mode.

On CUDA, float32 runs with TF32 off on both sides (torch.backends.cudnn.allow_tf32 and
torch.backends.cuda.matmul.allow_tf32), except in test_tf32, which checks the TF32 path against
the float64 reference with TF32's tolerance."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from helpers import (ALL_DTYPES, BAD_DTYPES, COMPILE_BACKEND, HALF_DTYPES, cfg_id, dtype_id, forward_backward,
                     grad_output_variants, import_ck, make_input, num_threads, raises_op_arg, switched)

ck = import_ck("conv2d", "nn", "reference")
OPS = torch.ops.convrnn


@contextlib.contextmanager
def tf32(enabled):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def exact_float32():
    with tf32(False):
        yield


# (input shape, weight shape, stride, padding, dilation, groups, bias)
CONFIGS = [
    ((2, 3, 9, 9), (4, 3, 3, 3), 1, 1, 1, 1, True),                  # 3x3 pad 1 (VGG, ResNet)
    ((2, 1, 12, 12), (6, 1, 5, 5), 1, 0, 1, 1, True),                # LeNet C1: one input channel
    ((1, 3, 23, 23), (8, 3, 11, 11), 4, 0, 1, 1, True),              # AlexNet CONV1 11x11/4
    ((2, 3, 16, 16), (8, 3, 7, 7), 2, 3, 1, 1, False),               # 7x7/2 stem, no bias
    ((2, 16, 7, 7), (8, 16, 1, 1), 1, 0, 1, 1, True),                # 1x1
    ((2, 8, 10, 10), (8, 1, 3, 3), 1, 1, 1, 8, True),                # depthwise
    ((2, 4, 9, 9), (8, 1, 3, 3), 2, 1, 1, 4, True),                  # depthwise, multiplier 2, stride 2
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2, True),   # groups, non-square everything
    ((3, 7, 9), (5, 3, 2, 2), 1, 1, 1, 1, True),                     # unbatched, even kernel
    ((1, 20, 6, 7), (33, 20, 3, 3), 1, 1, 1, 1, True),               # channel counts off the vector width
    ((2, 3, 5, 70), (4, 3, 3, 3), (1, 2), (0, 1), 1, 1, True),       # wide rows
    ((1, 2, 4, 4), (3, 2, 4, 4), 1, 0, 1, 1, True),                  # kernel = input: 1x1 output
    ((2, 5, 11, 10), (6, 5, 3, 3), 3, 2, 2, 1, True),                # stride 3, dilation 2
    ((2, 64, 6, 6), (64, 64, 3, 3), 1, 1, 1, 1, True),               # full channel blocks
    ((1, 6, 5, 5), (4, 6, 1, 1), 2, 0, 1, 1, True),                  # strided 1x1 (ResNet downsample)
]


def make_args(cfg, dtype, device, channels_last=False, seed=0):
    shape, wshape, stride, padding, dilation, groups, bias = cfg
    x = make_input(shape, dtype, device, channels_last=channels_last and len(shape) == 4, seed=seed)
    w = make_input(wshape, dtype, device, seed=seed + 1) / (wshape[1] * wshape[2] * wshape[3]) ** 0.5
    b = make_input((wshape[0],), dtype, device, seed=seed + 2) if bias else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def op_args(kw):
    """stride, padding, dilation (as int pairs) and groups of kw, as the dispatcher ops take them."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]), kw["groups"]


def conv_grads(fn, x, w, b, kw, gout=None):
    """(output, grads of x, w, b, grad_output) of fn(x, w, b, **kw)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(*leaves, **kw)
    if gout is None:
        g = torch.Generator().manual_seed(7)
        gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    diff = [t for t in leaves if t is not None]
    grads = list(torch.autograd.grad(out, diff, gout))
    if b is None:
        grads.append(None)
    return out, grads[0], grads[1], grads[2], gout


def assert_conv_close(ours, expected, what=""):
    """float32/64: the sums differ only in order, so the tolerance scales with the largest
    |expected| (a sum of many products can cancel to near zero)."""
    assert ours.shape == expected.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    assert ours.dtype == expected.dtype, f"{what}: dtype {ours.dtype} != {expected.dtype}"
    eps = 2e-5 if ours.dtype == torch.float32 else 1e-12
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(ours, expected, rtol=eps, atol=eps * scale, msg=lambda m: f"{what}: {m}")


def assert_conv_half_ok(ours, theirs, ref32, what=""):
    """Half types: error vs the float32 result at most 2x torch's own + 2 ulps of the largest
    |ref32| (as helpers.assert_half_ok, with one more ulp for the longer sums)."""
    ours32, theirs32, ref32 = ours.float(), theirs.float(), ref32.float()
    assert torch.isfinite(ours32).all(), f"{what}: non-finite values"
    err_ours = (ours32 - ref32).abs().max().item() if ref32.numel() else 0.0
    err_torch = (theirs32 - ref32).abs().max().item() if ref32.numel() else 0.0
    scale = max(1.0, ref32.abs().max().item()) if ref32.numel() else 1.0
    bound = 2 * err_torch + 2 * torch.finfo(ours.dtype).eps * scale
    assert err_ours <= bound, f"{what}: {ours.dtype} error {err_ours:.3g} > 2 x torch's {err_torch:.3g} + 2 ulp"


def torch_conv_grads_on(device, x, w, b, kw, gout):
    """conv_grads of F.conv2d run on `device` (its inputs copied there, memory format kept),
    the results moved back to x's device."""
    moved = [None if t is None else t.to(device) for t in (x, w, b, gout)]
    return [None if t is None else t.to(x.device) for t in conv_grads(F.conv2d, *moved[:3], kw, moved[3])]


def check_against_torch(x, w, b, kw, what="", torch_device=None):
    """Ours vs torch (and float32/64 also vs the reference): output and all three gradients,
    in the format torch gives (channels_last stays channels_last).  torch_device: where torch's
    side runs when not on x's device (a case torch's CUDA kernels do not take)."""
    out, gx, gw, gb, gout = conv_grads(ck.conv2d, x, w, b, kw)
    if x.dtype in HALF_DTYPES:
        r32 = conv_grads(F.conv2d, x.float(), w.float(), None if b is None else b.float(), kw, gout.float())
        try:
            theirs = conv_grads(F.conv2d, x, w, b, kw, gout)
        except (RuntimeError, NotImplementedError):  # torch lacks this half kernel: its float32 result rounded
            theirs = [None if t is None else t.to(x.dtype) for t in r32]
        for name, a, t, r in zip(("values", "grad input", "grad weight", "grad bias"), (out, gx, gw, gb),
                                 theirs[:4], r32[:4]):
            if a is not None:
                assert_conv_half_ok(a, t, r, f"{what} {name}")
    else:
        theirs = (conv_grads(F.conv2d, x, w, b, kw, gout) if torch_device is None
                  else torch_conv_grads_on(torch_device, x, w, b, kw, gout))
        refs = conv_grads(ck.reference.conv2d, x, w, b, kw, gout)
        for name, a, t, r in zip(("values", "grad input", "grad weight", "grad bias"), (out, gx, gw, gb),
                                 theirs[:4], refs[:4]):
            if a is None:
                assert t is None, f"{what} {name}: missing"
                continue
            assert_conv_close(a, t, f"{what} {name} vs torch")
            assert_conv_close(a, r, f"{what} {name} vs reference")
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output is not channels_last"
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_matches_torch_and_reference(device, cfg, dtype, channels_last):
    if channels_last and len(cfg[0]) != 4:
        pytest.skip("channels_last needs a 4-D input")
    x, w, b, kw = make_args(cfg, dtype, device, channels_last)
    check_against_torch(x, w, b, kw)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("wshape,dilation", [((4, 3, 3, 3), 1), ((4, 3, 4, 2), 1), ((4, 3, 2, 3), (2, 3)),
                                             ((4, 3, 5, 4), 2)], ids=lambda v: str(v).replace(" ", ""))
def test_padding_strings(device, padding, wshape, dilation):
    cfg = ((2, 3, 11, 10), wshape, 1, padding, dilation, 1, True)
    x, w, b, kw = make_args(cfg, torch.float64, device)
    out = check_against_torch(x, w, b, kw, f"padding={padding}")
    if padding == "same":
        assert out.shape[-2:] == x.shape[-2:]


def test_gradcheck(device):
    for cfg in (CONFIGS[7], CONFIGS[6], CONFIGS[12], ((1, 2, 5, 6), (3, 2, 2, 3), 1, "same", 1, 1, True)):
        x, w, b, kw = make_args(cfg, torch.float64, device)
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
        # fast mode: random projections of the Jacobian (the full one takes 20 s of CI time here)
        assert torch.autograd.gradcheck(lambda *t: ck.conv2d(*t, **kw), leaves, fast_mode=True), cfg


@given(n=st.integers(0, 2), cg=st.integers(1, 5), kg=st.integers(1, 5), groups=st.integers(1, 3),
       h=st.integers(1, 12), w=st.integers(1, 12), r=st.integers(1, 4), s=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       ph=st.integers(0, 2), pw=st.integers(0, 2), bias=st.booleans(), channels_last=st.booleans())
def test_random_shapes(n, cg, kg, groups, h, w, r, s, sh, sw, dh, dw, ph, pw, bias, channels_last):
    if dh * (r - 1) + 1 > h + 2 * ph or dw * (s - 1) + 1 > w + 2 * pw:
        return  # no output: the bad-input tests cover it
    cfg = ((n, cg * groups, h, w), (kg * groups, cg, r, s), (sh, sw), (ph, pw), (dh, dw), groups, bias)
    for device in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]):
        x, wt, b, kw = make_args(cfg, torch.float64, device, channels_last)
        check_against_torch(x, wt, b, kw, f"random {cfg} {device}")


def test_backward_is_deterministic(device):
    x, w, b, kw = make_args(((4, 16, 15, 15), (16, 16, 3, 3), 1, 1, 1, 1, True), torch.float32, device)
    with num_threads(2):
        first = conv_grads(ck.conv2d, x, w, b, kw)
        for _ in range(3):
            again = conv_grads(ck.conv2d, x, w, b, kw, first[-1])
            for a, e in zip(again[:4], first[:4]):
                assert torch.equal(a, e)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True), (True, False, True)], ids=cfg_id)
def test_output_mask(device, mask):
    """The backward op computes only what is asked; the rest come back as (0,) placeholders."""
    x, w, b, kw = make_args(CONFIGS[7], torch.float64, device)
    _, egx, egw, egb, gout = conv_grads(F.conv2d, x, w, b, kw)
    gi, gw, gb = OPS.conv2d_backward(gout, x, w, *op_args(kw), list(mask))
    for want, got, expected in zip(mask, (gi, gw, gb), (egx, egw, egb)):
        if want:
            assert_conv_close(got, expected)
        else:
            assert got.shape == (0,)


def test_only_needed_gradients(device):
    x, w, b, kw = make_args(CONFIGS[0], torch.float64, device)
    x.requires_grad_(False)
    w, b = w.requires_grad_(), b.requires_grad_(False)
    ck.conv2d(x, w, b, **kw).sum().backward()
    assert w.grad is not None and b.grad is None and x.grad is None


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (True, True, None)], ids=cfg_id)
def test_eager_route_matches_dispatcher_route(device, needs):
    """ck.conv2d in eager mode (the C++ twin of Conv2dFunction, csrc/image_ops_autograd.cpp) and
    the bare op through the dispatcher (the registered Python autograd, what torch.compile
    traces) give the same values and gradients, bit for bit, for any set of inputs needing a
    gradient (None: no bias)."""
    x, w, b, kw = make_args(CONFIGS[7], torch.float64, device)
    if needs[2] is None:
        b = None
    results = []
    for route in ("eager", "dispatcher"):
        leaves = [t.detach().clone().requires_grad_(bool(n)) if t is not None else None
                  for t, n in zip((x, w, b), needs)]
        if route == "eager":
            out = ck.conv2d(*leaves, **kw)
            assert "CppNode" in out.grad_fn.name(), out.grad_fn.name()
        else:
            out = OPS.conv2d(*leaves, *op_args(kw))
            assert "CppNode" not in out.grad_fn.name(), out.grad_fn.name()
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(device)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        results.append((out, torch.autograd.grad(out, wanted, gout)))
    (o1, g1), (o2, g2) = results
    assert len(g1) == len(g2) == sum(bool(n) for n in needs)
    for a, c in zip((o1,) + g1, (o2,) + g2):
        assert torch.equal(a, c)


def test_channels_last_weight(device):
    x, w, b, kw = make_args(CONFIGS[0], torch.float32, device)
    wcl = w.contiguous(memory_format=torch.channels_last)
    out = check_against_torch(x, wcl, b, kw, "channels_last weight")
    assert out.stride() == F.conv2d(x, wcl, b, **kw).stride()
    ours, theirs = (conv_grads(f, x, wcl, b, kw)[2] for f in (ck.conv2d, F.conv2d))
    assert ours.stride() == theirs.stride(), "grad weight keeps the weight's layout, as torch's"
    x, wcl = x.contiguous(memory_format=torch.channels_last), wcl.requires_grad_()
    torch.library.opcheck(OPS.conv2d_backward.default,
                          (torch.randn_like(F.conv2d(x, wcl.detach(), b, **kw)), x, wcl.detach(), *op_args(kw),
                           [True, True, True]))


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input(device, view):
    x, w, b, kw = make_args(CONFIGS[0], torch.float32, device)
    if view == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif view == "sliced":
        x = torch.cat([x, x], dim=1)[:, ::2]
    else:
        x = x[:1].expand(3, -1, -1, -1)
    check_against_torch(x, w[:, :, :, :], b, kw, view)
    check_against_torch(x, w.transpose(-1, -2).contiguous().transpose(-1, -2), b, kw, view + " weight")


def test_non_contiguous_grad_output(device):
    x, w, b, kw = make_args(CONFIGS[12], torch.float64, device)
    x, w = x.requires_grad_(), w.requires_grad_()
    out, eout = ck.conv2d(x, w, b, **kw), F.conv2d(x, w, b, **kw)
    for name, gout in grad_output_variants(out).items():
        got = torch.autograd.grad(out, (x, w), gout, retain_graph=True)
        expected = torch.autograd.grad(eout, (x, w), gout, retain_graph=True)
        for a, e in zip(got, expected):
            assert_conv_close(a, e, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(device, channels_last):
    x, w, b, kw = make_args(((0, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True), torch.float32, device, channels_last)
    out, gx, gw, gb, _ = conv_grads(ck.conv2d, x, w, b, kw)
    assert out.shape == (0, 4, 8, 8) and gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_argument_forms(device):
    x = make_input((2, 4, 9, 8), torch.float64, device)
    w = make_input((6, 2, 3, 2), torch.float64, device, seed=1)
    assert_conv_close(ck.conv2d(x, w, None, (2, 1), (1, 0), (1, 2), 2), F.conv2d(x, w, None, (2, 1), (1, 0), (1, 2), 2))
    assert_conv_close(ck.conv2d(x, w, stride=[2], padding=[1], groups=2), F.conv2d(x, w, stride=2, padding=1, groups=2))
    assert_conv_close(ck.conv2d(input=x, weight=w, groups=2), F.conv2d(x, w, groups=2))


# ---- bad input -------------------------------------------------------------------------

BAD_ARGS = [  # (input shape, weight shape, bias shape, kwargs, argument named in the message)
    ((1, 4, 8, 8), (2, 3, 3, 3), None, {}, "channels"),                       # C != Cg * groups
    ((1, 4, 8, 8), (3, 2, 3, 3), None, dict(groups=2), "out_channels"),       # K % groups
    ((1, 4, 8, 8), (2, 4, 3), None, {}, "weight"),                            # 3-D weight
    ((1, 4, 8, 8), (2, 4, 3, 3), (3,), {}, "bias"),                           # bias size
    ((1, 4, 3, 3), (2, 4, 5, 5), None, {}, "kernel size"),                    # kernel > padded input
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(stride=0), "stride"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(dilation=(1, 0)), "dilation"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(padding=-1), "padding"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(padding="same", stride=2), "padding"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(padding="full"), "padding"),
    ((4, 8, 8, 1, 1), (2, 4, 3, 3), None, {}, "input"),                       # 5-D input
    ((8, 8), (2, 4, 3, 3), None, {}, "input"),                                # 2-D input
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(groups=0), "groups"),
]


@pytest.mark.parametrize("shape,wshape,bshape,kwargs,arg", BAD_ARGS,
                         ids=[f"{a}-{i}" for i, (*_, a) in enumerate(BAD_ARGS)])
def test_bad_arguments(device, shape, wshape, bshape, kwargs, arg):
    x, w = torch.randn(shape, device=device), torch.randn(wshape, device=device)
    b = torch.randn(bshape, device=device) if bshape else None
    with raises_op_arg("conv2d", arg):
        ck.conv2d(x, w, b, **kwargs)


def test_mixed_dtypes_and_devices(device):
    x, w = torch.randn(1, 4, 8, 8, device=device), torch.randn(2, 4, 3, 3, device=device)
    with raises_op_arg("conv2d", "weight"):
        ck.conv2d(x, w.double())
    with raises_op_arg("conv2d", "bias"):
        ck.conv2d(x, w, torch.randn(2, device=device, dtype=torch.float64))
    if device == "cuda":
        with raises_op_arg("conv2d", "weight"):
            ck.conv2d(x, w.cpu())


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=dtype_id)
def test_bad_dtype(device, dtype):
    x, w = torch.ones(1, 4, 8, 8, dtype=dtype, device=device), torch.ones(2, 4, 3, 3, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=r"(?s)convrnn\.conv2d.*input"):
        ck.conv2d(x, w)


def test_backward_bad_grad_output(device):
    x, w = torch.randn(1, 4, 8, 8, device=device), torch.randn(2, 4, 3, 3, device=device)
    with raises_op_arg("conv2d_backward", "grad_output"):
        OPS.conv2d_backward(torch.randn(1, 2, 5, 5, device=device), x, w, [1, 1], [0, 0], [1, 1], 1,
                            [True, True, True])


# ---- dispatcher integration: opcheck and torch.compile ------------------------------------

@pytest.mark.parametrize("cfg,channels_last", [(CONFIGS[0], False), (CONFIGS[0], True), (CONFIGS[7], False),
                                               (CONFIGS[3], True)], ids=["nchw", "nhwc", "groups", "nobias"])
def test_opcheck(device, cfg, channels_last):
    x, w, b, kw = make_args(cfg, torch.float32, device, channels_last)
    args = op_args(kw)
    torch.library.opcheck(OPS.conv2d.default, (x.requires_grad_(), w.requires_grad_(),
                                               None if b is None else b.requires_grad_(), *args))
    out = OPS.conv2d(x.detach(), w.detach(), b, *args)
    gout = torch.randn_like(out)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(OPS.conv2d_backward.default, (gout, x.detach(), w.detach(), *args, mask))


def test_torch_compile(device):
    torch._dynamo.reset()
    conv = ck.nn.Conv2d(3, 4, 3, padding=1).to(device)

    def model(t):
        return ck.conv2d(torch.relu(conv(t)), conv.weight.transpose(0, 1), None, padding="same")

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x = make_input((2, 3, 8, 7), torch.float32, device)
    out, gx, gout = forward_backward(compiled, x)
    eout, egx, _ = forward_backward(model, x, gout)
    torch.testing.assert_close(out, eout, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, egx, rtol=1e-5, atol=1e-6)


# ---- module --------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, padding=(2, 1)),
                                    dict(kernel_size=3, padding="same", dilation=2, groups=2, bias=False)],
                         ids=["3x3", "strided", "same-groups"])
def test_module_matches_torch(device, padding_mode, kwargs):
    torch.manual_seed(3)
    ours = ck.nn.Conv2d(4, 6, padding_mode=padding_mode, **kwargs).to(device).double()
    torch.manual_seed(3)
    theirs = torch.nn.Conv2d(4, 6, padding_mode=padding_mode, **kwargs).to(device).double()
    assert repr(ours) == repr(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 4, 9, 8), torch.float64, device).requires_grad_()
    out, eout = ours(x), theirs(x)
    assert_conv_close(out, eout, "module values")
    gout = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(ours.parameters()), gout)
    expected = torch.autograd.grad(eout, [x] + list(theirs.parameters()), gout)
    for a, e in zip(got, expected):
        assert_conv_close(a, e, "module grads")


def test_module_unbatched_and_errors():
    conv = ck.nn.Conv2d(3, 5, 3)
    assert conv(torch.randn(3, 8, 8)).shape == (5, 6, 6)
    assert isinstance(conv, torch.nn.Conv2d)
    with pytest.raises(ValueError):
        ck.nn.Conv2d(3, 5, 3, padding_mode="mirror")
    with pytest.raises(ValueError):
        ck.nn.Conv2d(3, 5, 3, groups=2)


def test_tf32():
    """With TF32 allowed (torch's default), float32 on CUDA may use the TF32 tensor-core path:
    within TF32's error of the float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w, b, kw = make_args(((4, 64, 14, 14), (64, 64, 3, 3), 1, 1, 1, 1, True), torch.float32, "cuda")
    with tf32(True):
        out, gx, gw, gb, gout = conv_grads(ck.conv2d, x, w, b, kw)
    ref = conv_grads(ck.reference.conv2d, x.double(), w.double(), b.double(), kw, gout.double())
    for name, a, r in zip(("values", "grad input", "grad weight", "grad bias"), (out, gx, gw, gb), ref[:4]):
        rel = ((a.double() - r).norm() / r.norm()).item()
        assert rel < 2e-3, f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_results_do_not_alias_scratch(device, channels_last):
    """The CPU kernels keep layout scratch buffers between calls: no result may live in one
    (a later call would overwrite it), and no input is written."""
    cfgs = [CONFIGS[0], CONFIGS[5], CONFIGS[4]]  # the GEMM engine, depthwise, 1x1
    for cfg in cfgs:
        x, w, b, kw = make_args(cfg, torch.float32, device, channels_last)
        inputs = [t.clone() for t in (x, w, b)]
        first = conv_grads(ck.conv2d, x, w, b, kw)
        assert all(torch.equal(a, k) for a, k in zip((x, w, b), inputs)), "the op changed its inputs"
        kept = [t.clone() for t in first[:4]]
        x2, w2, b2, _ = make_args(cfg, torch.float32, device, channels_last, seed=5)
        conv_grads(ck.conv2d, x2, w2, b2, kw)
        for a, k in zip(first[:4], kept):
            assert torch.equal(a, k), f"{cfg}: a result changed when the op ran again"


# Layers that conv2d CUDA round 3 runs differently (csrc/conv2d.h: conv_r3_mode): the
# float32 SIMT tile on a 132-SM GPU (csrc/cuda/conv2d_plan.cuh: simt_image_tile) for AlexNet
# CONV2, the GoogLeNet/ResNet 1x1, LeNet-5 C3 and CIFAR ResNet; the direct backward data of
# 2-4 input channels (dgrad_small_c_kernel) for the C = 3 layers, AlexNet CONV1 (11x11/4) and
# the 7x7/2 stem, here at smaller sizes; the depthwise tile kernels' taller tiles.
R3_CONFIGS = [
    ((8, 96, 27, 27), (256, 96, 5, 5), 1, 2, 1, 1, True),
    ((8, 256, 28, 28), (128, 256, 1, 1), 1, 0, 1, 1, True),
    ((64, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1, True),
    ((32, 16, 32, 32), (16, 16, 3, 3), 1, 1, 1, 1, True),
    ((2, 3, 63, 61), (96, 3, 11, 11), 4, 0, 1, 1, True),
    ((2, 3, 56, 50), (64, 3, 7, 7), 2, 3, 1, 1, False),
    ((2, 2, 19, 17), (16, 2, 3, 3), 1, 1, 2, 1, True),
    ((2, 4, 15, 16), (32, 4, 4, 3), (3, 2), (1, 0), 1, 1, True),
    ((2, 64, 40, 36), (64, 1, 3, 3), 1, 1, 1, 64, True),        # depthwise: taller tiles
    ((2, 16, 70, 20), (32, 1, 3, 3), 1, 1, 1, 16, False),       # depthwise, multiplier 2
]


def conv_r3(on):
    """conv2d CUDA round 3 on or off (round 2's kernels); .launches counts the launches that
    took a round-3 path."""
    return switched(torch.ops.convrnn._conv2d_r3, on)


@pytest.mark.parametrize("name,highest", [("_conv2d_r3", 1), ("_conv2d_dw_vec", 2)])
def test_switch_ops(name, highest):
    """conv2d's runtime switches (round 3; round 5's depthwise vector kernel, whose mode 2 takes 8
    outputs a thread) answer (mode, launches), restore, and name themselves on a bad mode."""
    op = getattr(torch.ops.convrnn, name)
    before, _ = op()
    assert 0 <= before <= highest
    with switched(op, False):
        assert op()[0] == 0
    assert op()[0] == before
    with pytest.raises(RuntimeError, match=f"{name}: mode must be"):
        op(highest + 1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", R3_CONFIGS, ids=cfg_id)
def test_cuda_r3_same_bits(cfg, channels_last):
    """float32 (TF32 off): round 3 (SM-fitted SIMT tiles, taller depthwise tiles) gives round
    2's results bit for bit (every output is the same sum in the same order; a zero's sign
    aside, which torch.equal ignores), takes its round-3 path, and agrees with torch.  The
    direct small-C backward data (2-4 input channels, one group) splits each pixel's sum over
    8 lanes, so its grad input matches round 2's to rounding only."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w, b, kw = make_args(cfg, torch.float32, "cuda", channels_last)
    small_c = kw["groups"] == 1 and 2 <= x.shape[1] <= 4
    with conv_r3(False) as off:
        old = conv_grads(ck.conv2d, x, w, b, kw)
    with conv_r3(True) as on:
        new = conv_grads(ck.conv2d, x, w, b, kw, old[4])
    assert off.launches == 0 and on.launches >= 1, (off.launches, on.launches)
    for name, a, c in zip(("values", "grad input", "grad weight", "grad bias"), new[:4], old[:4]):
        if small_c and name == "grad input":
            assert_conv_close(a, c, f"{name}: round 3 against round 2")
        else:
            assert (a is None and c is None) or torch.equal(a, c), f"{name}: round 3 changed the result"
    theirs = conv_grads(F.conv2d, x, w, b, kw, old[4])
    for name, a, t in zip(("values", "grad input"), new[:2], theirs[:2]):
        assert_conv_close(a, t, f"{name} vs torch")


# Depthwise channels_last layers that round 5's vector kernel takes (Kg = 1, C % 4 == 0, square
# 3x3 or 5x5, column stride and dilation 1; csrc/cuda/conv2d_depthwise.cu: vec_plan): rows of
# stride 2 and dilation 2, padding, a width that leaves a partial strip of 4 outputs, no bias.
DW_VEC_CONFIGS = [
    ((2, 32, 23, 18), (32, 1, 3, 3), 1, 1, 1, 32, True),
    ((2, 12, 17, 9), (12, 1, 5, 5), 1, 2, 1, 12, True),
    ((3, 8, 15, 14), (8, 1, 3, 3), (2, 1), (1, 0), (2, 1), 8, False),
    ((1, 16, 9, 7), (16, 1, 5, 5), 1, (2, 1), 1, 16, True),
]


def dw_vec(on):
    """conv2d CUDA round 5 (the depthwise channels_last vector kernel) on or off; .launches
    counts its launches."""
    return switched(torch.ops.convrnn._conv2d_dw_vec, on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg", DW_VEC_CONFIGS, ids=cfg_id)
def test_cuda_dw_vec_same_bits(cfg, dtype):
    """The vector kernel gives the tile kernel's values and (stride 1, channels_last
    grad_output) input gradient bit for bit, takes its path in both, and agrees with torch;
    with an NCHW grad_output the backward data falls back to the tile."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w, b, kw = make_args(cfg, dtype, "cuda", channels_last=True)
    stride1 = kw["stride"] == 1
    with torch.no_grad():
        shape = ck.conv2d(x, w, b, **kw).shape
    gout = make_input(shape, dtype, "cuda", channels_last=True, seed=5)
    with dw_vec(False) as off:
        old = conv_grads(ck.conv2d, x, w, b, kw, gout)
    with dw_vec(True) as on:
        new = conv_grads(ck.conv2d, x, w, b, kw, gout)
    before, start = torch.ops.convrnn._conv2d_dw_vec(2)  # mode 2: 8 outputs a thread
    try:
        new8 = conv_grads(ck.conv2d, x, w, b, kw, gout)
    finally:
        _, end = torch.ops.convrnn._conv2d_dw_vec(before)
    assert off.launches == 0 and on.launches == (2 if stride1 else 1), (off.launches, on.launches)
    assert end - start == on.launches
    for got in (new, new8):
        for name, a, c in zip(("values", "grad input", "grad weight", "grad bias"), got[:4], old[:4]):
            assert (a is None and c is None) or torch.equal(a, c), f"{name}: the vector kernel changed the result"
    assert new[0].is_contiguous(memory_format=torch.channels_last)
    with dw_vec(True) as on:
        check_against_torch(x, w, b, kw, f"{cfg} {dtype}")
        conv_grads(ck.conv2d, x, w, b, kw, gout.contiguous())
    assert on.launches == 2, on.launches  # both forwards; neither NCHW-grad backward


def test_cuda_dw_vec_declines_misaligned_input():
    """An input view one channel-vector lane off the 16-byte alignment runs the tile kernel,
    with the same results."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = DW_VEC_CONFIGS[0]
    x, w, b, kw = make_args(cfg, torch.float32, "cuda", channels_last=True)
    n, c, h, wd = x.shape
    flat = torch.empty(x.numel() + 1, device="cuda")
    shifted = flat[1:].view(n, h, wd, c).permute(0, 3, 1, 2)
    shifted.copy_(x)
    with dw_vec(True) as on:
        out = ck.conv2d(shifted, w, b, **kw)
    assert on.launches == 0
    with dw_vec(True) as on:
        ref = ck.conv2d(x, w, b, **kw)
    assert on.launches == 1
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg", R3_CONFIGS[4:8], ids=cfg_id)
def test_cuda_small_c_backward_data(cfg, dtype):
    """The direct small-C backward data in the other dtypes, against torch (half types within
    2x torch's own error)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, w, b, kw = make_args(cfg, dtype, "cuda", channels_last=True)
    with conv_r3(True) as on:
        check_against_torch(x, w, b, kw, f"{cfg} {dtype}")
    assert on.launches >= 1


@pytest.mark.parametrize("stride", [(1, 3), (3, 1), (5, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_one_by_one_stride_past_the_input(device, stride, dtype):
    """A 1x1 kernel whose stride passes the input in a dimension (W = 2, stride 3: one output
    column) runs with stride 1 there, yet its output is smaller than its input: the CPU's NCHW
    1x1 kernel once took it and wrote W pixels a row into an output of one (a heap overrun
    that glibc reported a few calls later)."""
    x = torch.randn(2, 3, 8, 2, dtype=dtype, device=device)
    w = torch.randn(16, 3, 1, 1, dtype=dtype, device=device)
    for _ in range(3):  # the overrun corrupted the heap silently; repeated calls let glibc notice
        check_against_torch(x, w, torch.randn(16, dtype=dtype, device=device), dict(stride=stride), f"stride {stride}")


@pytest.mark.parametrize("stride", [(1, 10**8), (10**8, 1), (10**9, 10**9), (2**40, 3)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "depthwise"])
def test_stride_far_past_the_input(device, stride, channels_last, groups):
    """A stride larger than the input gives one output along that dimension, which torch accepts;
    no memory or time grows with the stride (it stood in the size of row buffers and of the
    backward's phase table), and values and gradients match torch's.  torch's CUDA convolutions
    do not take a stride past 32 bits (torch 2.11 on an H200: cuDNN answers NOT_SUPPORTED, and the
    depthwise path kills the process with SIGFPE), so there torch's side runs on the CPU."""
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64, device=device)
    w = torch.randn(4, 2 // groups, 3, 2, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch_device = "cpu" if device != "cpu" and max(stride) >= 2**31 else None
    check_against_torch(x, w, torch.randn(4, dtype=torch.float64, device=device),
                        dict(stride=stride, padding=(1, 0), groups=groups), f"stride {stride}", torch_device)
