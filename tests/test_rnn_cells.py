"""convrnn recurrent cells (lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell: functional, fused
dispatcher ops, nn modules) against torch and convrnn_kernels/reference_rnn.py: values,
gradients of every input, sizes incl. empty and unbatched, dtypes, contiguity, determinism,
bad input, opcheck, compile.

The reference is loaded by file path, so its own tests run before (and without) the built
extension.  Each op family's tests skip, naming what is missing, while convrnn_kernels lacks
the functional, the module or the dispatcher op they test.

Half precision follows helpers.py: with ref32 torch's float32 result on the upcast inputs,
ours may be off by at most 2x torch's own half error plus one ulp."""
import inspect
import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (ALL_DTYPES, BAD_INPUT_ERRORS, COMPILE_BACKEND, FLOAT_DTYPES, HALF_DTYPES, assert_half_ok,
                     dtype_id, grad_output_like, grad_output_variants, load_reference, needs_cuda, num_threads)


ref = load_reference("reference_rnn")
try:
    import convrnn_kernels as ck
    _CK_ERROR = None
except ImportError as e:  # not built yet: the reference tests still run
    ck, _CK_ERROR = None, str(e)


class Cell(NamedTuple):
    name: str          # the functional's name in convrnn_kernels, reference_rnn and torch
    gates: int         # gate blocks stacked in the weights' rows
    module: str        # torch.nn class
    module_kwargs: dict
    op_re: str         # how an error message may name the op

    @property
    def lstm(self):
        return self.gates == 4


CELLS = {c.name: c for c in [
    Cell("lstm_cell", 4, "LSTMCell", {}, "lstm_cell"),
    Cell("gru_cell", 3, "GRUCell", {}, "gru_cell"),
    Cell("rnn_tanh_cell", 1, "RNNCell", {"nonlinearity": "tanh"}, r"rnn_(?:tanh_)?cell"),
    Cell("rnn_relu_cell", 1, "RNNCell", {"nonlinearity": "relu"}, r"rnn_(?:relu_)?cell"),
]}
NAMES = ["input", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh"]
# (B, I, H); B None = unbatched 1-D input
SIZES = [(1, 65, 128), (3, 5, 7), (0, 4, 6), (None, 5, 7), (33, 9, 129)]
# ours vs torch / the reference in one dtype: summation orders of the matmuls and gate sums differ
CELL_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def size_id(size):
    b, i, h = size
    return f"unbatched-{i}x{h}" if b is None else f"{b}x{i}x{h}"


def _ck_or_skip():
    if ck is None:
        pytest.skip(f"convrnn_kernels does not import: {_CK_ERROR}")
    return ck


def ours(cell):
    """convrnn_kernels.<cell>, or skip: that op family is not implemented yet."""
    if not hasattr(_ck_or_skip(), cell.name):
        pytest.skip(f"convrnn_kernels.{cell.name} is not implemented yet")
    return getattr(ck, cell.name)


def fused_op(name):
    """torch.ops.convrnn.<name>, or skip: that dispatcher op is not registered yet."""
    _ck_or_skip()
    if not hasattr(torch.ops.convrnn, name):
        pytest.skip(f"torch.ops.convrnn.{name} is not registered yet")
    return getattr(torch.ops.convrnn, name)


def _has_op(name):
    return ck is not None and hasattr(torch.ops.convrnn, name)


def module_cls(cell):
    if not hasattr(_ck_or_skip().nn, cell.module):
        pytest.skip(f"convrnn_kernels.nn.{cell.module} is not implemented yet")
    return getattr(ck.nn, cell.module)


@pytest.fixture(params=list(CELLS))
def cell(request):
    """A cell whose functional exists (skips the test otherwise)."""
    spec = CELLS[request.param]
    ours(spec)
    return spec


def torch_fn(cell):
    """torch.<cell>, lifted to unbatched inputs as torch.nn.*Cell does."""
    f = getattr(torch, cell.name)

    def run(x, hx, *params):
        if x.dim() != 1:
            return f(x, hx, *params)
        hx = tuple(t.unsqueeze(0) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
        out = f(x.unsqueeze(0), hx, *params)
        return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)
    return run


def make_cell_inputs(cell, b, i, h, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """input, h, c (LSTM only, else None), weights and biases (None without bias).  Weights are
    scaled so that pre-activations spread over [-4, 4]: both saturated and linear gates."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, scale):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    batch = () if b is None else (b,)
    rows, k = cell.gates * h, 1.5 / math.sqrt(max(h, 1))
    return {"input": rnd(batch + (i,), 1.0), "h": rnd(batch + (h,), 0.8),
            "c": rnd(batch + (h,), 1.0) if cell.lstm else None,
            "w_ih": rnd((rows, i), k), "w_hh": rnd((rows, h), k),
            "b_ih": rnd((rows,), 0.5) if bias else None, "b_hh": rnd((rows,), 0.5) if bias else None}


def call(fn, cell, t):
    """fn(input, hx, w_ih, w_hh, b_ih, b_hh) as a tuple of outputs ((h, c) or (h,))."""
    hx = (t["h"], t["c"]) if cell.lstm else t["h"]
    out = fn(t["input"], hx, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])
    return tuple(out) if cell.lstm else (out,)


def fwd_bwd(fn, cell, t, gouts=None, seed=1):
    """(outputs, {name: grad} for every given input, grad_outputs)."""
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in t.items()}
    outs = call(fn, cell, leaves)
    if gouts is None:
        gouts = tuple(grad_output_like(o, seed + j) for j, o in enumerate(outs))
    names = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], gouts, allow_unused=True)
    return outs, dict(zip(names, grads)), gouts


def _upcast(t):
    return {k: None if v is None else v.float() for k, v in t.items()}


def check_against_torch(fn, cell, t, what="", gouts=None, reference=True):
    """Values and all gradients of fn vs torch (and vs the reference for float32/64)."""
    outs, grads, gouts = fwd_bwd(fn, cell, t, gouts)
    dtype = t["input"].dtype
    touts, tgrads, _ = fwd_bwd(torch_fn(cell), cell, t, gouts)
    if dtype in HALF_DTYPES:
        routs, rgrads, _ = fwd_bwd(torch_fn(cell), cell, _upcast(t), tuple(g.float() for g in gouts))
        for j, (o, e, r) in enumerate(zip(outs, touts, routs)):
            assert_half_ok(o, e, r, f"{what} output {j}")
        for k in grads:
            assert grads[k] is not None, f"{what}: no gradient for {k}"
            assert_half_ok(grads[k], tgrads[k], rgrads[k], f"{what} grad {k}")
        return outs, grads, gouts
    expected = [("torch", touts, tgrads)]
    if reference:
        expected.append(("reference", *fwd_bwd(getattr(ref, cell.name), cell, t, gouts)[:2]))
    for who, eouts, egrads in expected:
        for j, (o, e) in enumerate(zip(outs, eouts)):
            assert o.dtype == e.dtype and o.shape == e.shape, f"{what} output {j}: {o.dtype}{tuple(o.shape)}"
            torch.testing.assert_close(o, e, **CELL_TOL[dtype], msg=lambda m: f"{what} output {j} vs {who}: {m}")
        for k in grads:
            assert grads[k] is not None and grads[k].shape == t[k].shape, f"{what}: gradient of {k}"
            torch.testing.assert_close(grads[k], egrads[k], **CELL_TOL[dtype],
                                       msg=lambda m: f"{what} grad {k} vs {who}: {m}")
    return outs, grads, gouts


# ---- the reference itself (runs without the extension) --------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("name", list(CELLS))
def test_reference_matches_torch(name, size, dtype, bias):
    cell = CELLS[name]
    t = make_cell_inputs(cell, *size, dtype, bias=bias)
    check_against_torch(getattr(ref, name), cell, t, f"reference {name}", reference=False)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(CELLS))
def test_reference_half_rounds_once(name, dtype):
    """In half precision the reference is the float64 result rounded to the dtype."""
    cell = CELLS[name]
    t = make_cell_inputs(cell, 3, 5, 7, dtype)
    outs = call(getattr(ref, name), cell, t)
    exact = call(getattr(ref, name), cell, {k: None if v is None else v.double() for k, v in t.items()})
    for o, e in zip(outs, exact):
        assert o.dtype == dtype and torch.equal(o, e.to(dtype))


# ---- functional: values and gradients ---------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_matches_torch_and_reference(device, cell, size, dtype, bias):
    t = make_cell_inputs(cell, *size, dtype, device, bias)
    outs, _, _ = check_against_torch(ours(cell), cell, t, f"{cell.name} {size_id(size)}")
    batch = () if size[0] is None else (size[0],)
    for o in outs:
        assert o.shape == batch + (size[2],) and o.dtype == dtype and o.device == t["input"].device


@pytest.mark.parametrize("size", [(2, 3, 4), (None, 3, 2), (1, 1, 1)], ids=size_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(device, cell, size, bias):
    t = make_cell_inputs(cell, *size, torch.float64, device, bias, seed=3)
    names = [k for k in NAMES if t[k] is not None]
    fn = ours(cell)

    def f(*args):
        d = dict.fromkeys(NAMES)
        d.update(zip(names, args))
        return call(fn, cell, d)
    assert torch.autograd.gradcheck(f, [t[k].requires_grad_() for k in names])


@given(b=st.integers(0, 5), i=st.integers(1, 12), h=st.integers(1, 12), bias=st.booleans(),
       unbatched=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=max(1, settings.default.max_examples * 3 // 5))
def test_random_sizes(device, cell, b, i, h, bias, unbatched, seed):
    size = (None if unbatched else b, i, h)
    t = make_cell_inputs(cell, *size, torch.float32, device, bias, seed=seed)
    check_against_torch(ours(cell), cell, t, f"random {size_id(size)} bias={bias}")


@pytest.mark.parametrize("used", ["h", "c"])
def test_lstm_one_output_used(device, used):
    """Only h' or only c' reaches the loss: the backward gets an undefined grad for the other."""
    cell = CELLS["lstm_cell"]
    fn = ours(cell)
    t = make_cell_inputs(cell, 3, 5, 7, torch.float64, device)
    gout = grad_output_like(t["h"], 4)
    results = []
    for f in (fn, torch_fn(cell)):
        leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
        h, c = call(f, cell, leaves)
        results.append(torch.autograd.grad(h if used == "h" else c, list(leaves.values()), gout, allow_unused=True))
    for k, g, e in zip(t, *results):
        if e is None:
            assert g is None or not g.any(), f"grad {k}: torch has none, ours is {g}"
        else:
            assert g is not None, f"grad {k}: ours is None, torch's is {e}"
            torch.testing.assert_close(g, e, **CELL_TOL[torch.float64], msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("variant", ["sum", "transposed", "batch_broadcast"])
def test_non_contiguous_inputs_and_grad_outputs(device, cell, variant):
    t = make_cell_inputs(cell, 4, 6, 5, torch.float32, device)
    h = t["h"]
    t["input"] = torch.cat([t["input"], t["input"]], 1)[:, ::2]          # column stride 2
    t["h"] = h[:1].expand_as(h)                                          # batch stride 0
    t["w_ih"] = t["w_ih"].t().contiguous().t()                           # transposed
    t["w_hh"] = torch.cat([t["w_hh"], t["w_hh"]], 1)[:, : h.shape[1]]    # row stride 2H
    if cell.lstm:
        t["c"] = t["c"].t().contiguous().t()
    assert not any(t[k].is_contiguous() for k in ("input", "h", "w_ih", "w_hh"))
    probe = call(torch_fn(cell), cell, t)
    gouts = tuple(grad_output_variants(o)[variant] for o in probe)
    check_against_torch(ours(cell), cell, t, f"non-contiguous, grad {variant}", gouts=gouts)


@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
def test_strided_bias(device, cell, which):
    t = make_cell_inputs(cell, 3, 4, 5, torch.float32, device)
    t[which] = torch.cat([t[which], t[which]])[::2]                      # stride 2
    check_against_torch(ours(cell), cell, t, f"{which} with stride 2")


def test_backward_is_deterministic(device, cell):
    t = make_cell_inputs(cell, 16, 33, 40, torch.float32, device, seed=7)
    with num_threads(2):
        _, g1, gouts = fwd_bwd(ours(cell), cell, t)
        _, g2, _ = fwd_bwd(ours(cell), cell, t, gouts)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad {k} differs between two backward passes"


# ---- bad input ----------------------------------------------------------------------------------

H_ARG = r"\bhx?\b"
C_ARG = r"\b(?:cx?|hx)\b"


def _bad_cases(cell):
    """{id: (argument, replacement shape, dtype, regex for the argument the message must name)},
    on the base sizes (B, I, H) = (3, 5, 7)."""
    g, b, i, h = cell.gates, 3, 5, 7
    wrong_rows = (g - 1) * h if g > 1 else 2 * h     # e.g. a GRU's 3H-row weight given to an LSTM
    f32, f64 = torch.float32, torch.float64
    cases = {
        "input_features": ("input", (b, i + 1), f32, "input"),
        "input_3d": ("input", (2, b, i), f32, "input"),
        "h_batch": ("h", (b + 1, h), f32, H_ARG),
        "h_hidden": ("h", (b, h + 1), f32, H_ARG + "|w_hh"),
        "h_unbatched": ("h", (h,), f32, H_ARG + "|input"),
        "w_ih_rows": ("w_ih", (wrong_rows, i), f32, "w_ih"),
        "w_hh_rows": ("w_hh", (wrong_rows, h), f32, "w_hh"),
        "w_hh_cols": ("w_hh", (g * h, h + 1), f32, "w_hh|" + H_ARG),
        "w_ih_1d": ("w_ih", (g * h * i,), f32, "w_ih"),
        "b_ih_size": ("b_ih", (g * h + 1,), f32, "b_ih"),
        "b_hh_size": ("b_hh", (g * h - 1,), f32, "b_hh"),
        "w_ih_dtype": ("w_ih", (g * h, i), f64, "w_ih"),
        "h_dtype": ("h", (b, h), f64, H_ARG),
        "b_hh_dtype": ("b_hh", (g * h,), f64, "b_hh"),
    }
    if cell.lstm:
        cases.update({"c_batch": ("c", (b + 1, h), f32, C_ARG), "c_hidden": ("c", (b, h + 1), f32, C_ARG),
                      "c_dtype": ("c", (b, h), f64, C_ARG)})
    return cases


def raises_named(op_re, arg_re):
    """pytest.raises for a bad-input error whose message names the op and the argument."""
    return pytest.raises(BAD_INPUT_ERRORS, match=rf"(?s)(?:{op_re}.*(?:{arg_re})|(?:{arg_re}).*{op_re})")


@pytest.mark.parametrize("name,case", [(n, c) for n in CELLS for c in _bad_cases(CELLS[n])])
def test_bad_arguments(device, name, case):
    cell = CELLS[name]
    fn = ours(cell)
    arg, shape, dtype, arg_re = _bad_cases(cell)[case]
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device)
    t[arg] = torch.randn(shape, dtype=dtype, device=device)
    with raises_named(cell.op_re, arg_re):
        call(fn, cell, t)


@pytest.mark.parametrize("missing", ["b_ih", "b_hh"])
def test_one_bias(device, cell, missing):
    """torch's cell functions take either bias alone: the same values and gradients (float64),
    and no gradient invented for the missing bias.  torch's side runs on the CPU: its CUDA LSTM
    and GRU cells (the fused _thnn kernels, torch 2.11 on an H200) fail on a lone b_ih and leave a
    lone b_hh out of the graph
    (its values are then those without b_hh)."""
    t = make_cell_inputs(cell, 3, 5, 7, torch.float64, device)
    t[missing] = None
    results = []
    for fn, dev in ((ours(cell), device), (torch_fn(cell), "cpu")):
        leaves = {k: v.detach().to(dev).clone().requires_grad_() for k, v in t.items() if v is not None}
        outs = call(fn, cell, {k: leaves.get(k) for k in t})
        grads = torch.autograd.grad([o.sum() for o in outs], list(leaves.values()))
        results.append([r.cpu() for r in outs + grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lstm_cell_hx_not_a_pair(device):
    """hx of three tensors, or not a tuple: an error naming the op and hx (torch: "lstm_cell
    expects two hidden states")."""
    cell = CELLS["lstm_cell"]
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device)
    for hx in ((t["h"], t["c"], t["c"]), (t["h"],), t["h"]):
        with raises_named("lstm_cell", "hx"):
            ours(cell)(t["input"], hx, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=dtype_id)
def test_bad_dtype(device, cell, dtype):
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device)
    t = {k: None if v is None else (v > 0).to(dtype) for k, v in t.items()}
    with raises_named(cell.op_re, "input|dtype"):
        call(ours(cell), cell, t)


@needs_cuda
def test_tensors_on_different_devices(cell):
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, "cuda")
    t["w_ih"] = t["w_ih"].cpu()
    with raises_named(cell.op_re, "w_ih|device"):
        call(ours(cell), cell, t)


# ---- fused dispatcher ops: values, backward ops, bad input, opcheck ------------------------------

def _rand(*shape, seed=0, device="cpu", dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _fused_inputs(gates, b, h, device, bias, dtype=torch.float64):
    gx, gh = _rand(b, gates * h, seed=1, device=device, dtype=dtype), _rand(b, gates * h, seed=2, device=device,
                                                                            dtype=dtype)
    bi = _rand(gates * h, seed=3, device=device, dtype=dtype, scale=0.5) if bias else None
    bh = _rand(gates * h, seed=4, device=device, dtype=dtype, scale=0.5) if bias else None
    return gx, gh, bi, bh


def _plus(t, b):
    return t if b is None else t + b


def _lstm_pointwise(pre, cx):
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def _gru_pointwise(gi, gh, hx):
    (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
    r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
    n = (in_ + r * hn).tanh()
    return (1 - z) * n + z * hx, torch.cat([r, z, n, hn], 1)


F64 = CELL_TOL[torch.float64]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b", [3, 0])
def test_lstm_fused_ops(device, bias, b):
    op, bop = fused_op("lstm_cell_fused"), fused_op("lstm_cell_fused_backward")
    h = 5
    gx, gh, bi, bh = _fused_inputs(4, b, h, device, bias)
    cx = _rand(b, h, seed=5, device=device)
    hy, cy, ws = op(gx, gh, cx, bi, bh)
    pre = _plus(_plus(gx + gh, bi), bh).requires_grad_()
    cxl = cx.clone().requires_grad_()
    ehy, ecy, ews = _lstm_pointwise(pre, cxl)
    for name, got, exp in [("hy", hy, ehy), ("cy", cy, ecy), ("workspace", ws, ews)]:
        torch.testing.assert_close(got, exp.detach(), **F64, msg=lambda m: f"{name}: {m}")
    ghy, gcy = _rand(b, h, seed=6, device=device), _rand(b, h, seed=7, device=device)
    for gh_, gc_ in [(ghy, gcy), (ghy, None), (None, gcy)]:
        pairs = [(o, g) for o, g in ((ehy, gh_), (ecy, gc_)) if g is not None]
        egates, ecx = torch.autograd.grad([o for o, _ in pairs], [pre, cxl], [g for _, g in pairs], retain_graph=True)
        ggates, gcx = bop(gh_, gc_, cx, cy, ws)
        what = f"grad_hy {'set' if gh_ is not None else 'None'}, grad_cy {'set' if gc_ is not None else 'None'}"
        torch.testing.assert_close(ggates, egates, **F64, msg=lambda m: f"{what} grad_gates: {m}")
        torch.testing.assert_close(gcx, ecx, **F64, msg=lambda m: f"{what} grad_cx: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b", [3, 0])
def test_gru_fused_ops(device, bias, b):
    op, bop = fused_op("gru_cell_fused"), fused_op("gru_cell_fused_backward")
    h = 5
    gx, gh, bi, bh = _fused_inputs(3, b, h, device, bias)
    hx = _rand(b, h, seed=5, device=device)
    hy, ws = op(gx, gh, hx, bi, bh)
    gil, ghl, hxl = _plus(gx, bi).requires_grad_(), _plus(gh, bh).requires_grad_(), hx.clone().requires_grad_()
    ehy, ews = _gru_pointwise(gil, ghl, hxl)
    torch.testing.assert_close(hy, ehy.detach(), **F64, msg=lambda m: f"hy: {m}")
    torch.testing.assert_close(ws, ews.detach(), **F64, msg=lambda m: f"workspace (r, z, n, gh_n + b_hn): {m}")
    ghy = _rand(b, h, seed=6, device=device)
    expected = torch.autograd.grad(ehy, [gil, ghl, hxl], ghy)
    for name, got, exp in zip(["grad_gates_x", "grad_gates_h", "grad_hx"], bop(ghy, hx, ws), expected):
        torch.testing.assert_close(got, exp, **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_rnn_fused_ops(device, bias, relu):
    op, bop = fused_op("rnn_cell_fused"), fused_op("rnn_cell_fused_backward")
    gx, gh, bi, bh = _fused_inputs(1, 3, 6, device, bias)
    pre = _plus(_plus(gx + gh, bi), bh).requires_grad_()
    ehy = pre.relu() if relu else pre.tanh()
    hy = op(gx, gh, bi, bh, relu)
    torch.testing.assert_close(hy, ehy.detach(), **F64)
    ghy = _rand(3, 6, seed=6, device=device)
    (epre,) = torch.autograd.grad(ehy, pre, ghy)
    torch.testing.assert_close(bop(ghy, hy, relu), epre, **F64)


def test_fused_bad_arguments(device):
    kw = dict(device=device, dtype=torch.float32)
    b, h = 3, 5
    cases = []
    _ck_or_skip()
    if _has_op("lstm_cell_fused"):
        lstm, lstm_b = fused_op("lstm_cell_fused"), fused_op("lstm_cell_fused_backward")
        g4, cx = torch.randn(b, 4 * h, **kw), torch.randn(b, h, **kw)
        cases += [
            ("lstm_cell", "gates", lambda: lstm(g4, torch.randn(b, 4 * h + 4, **kw), cx, None, None)),
            ("lstm_cell", "gates", lambda: lstm(torch.randn(b, 4 * h - 1, **kw), torch.randn(b, 4 * h - 1, **kw),
                                                cx, None, None)),
            ("lstm_cell", r"\bcx\b", lambda: lstm(g4, g4, torch.randn(b, h + 1, **kw), None, None)),
            ("lstm_cell", "b_ih", lambda: lstm(g4, g4, cx, torch.randn(4 * h + 1, **kw), None)),
            ("lstm_cell", "workspace", lambda: lstm_b(cx, cx, cx, cx, torch.randn(b, 3 * h, **kw))),
        ]
    if _has_op("gru_cell_fused"):
        gru, gru_b = fused_op("gru_cell_fused"), fused_op("gru_cell_fused_backward")
        g3, hx = torch.randn(b, 3 * h, **kw), torch.randn(b, h, **kw)
        cases += [
            ("gru_cell", "gates", lambda: gru(g3, torch.randn(b, 3 * h + 3, **kw), hx, None, None)),
            ("gru_cell", r"\bhx\b", lambda: gru(g3, g3, torch.randn(b + 1, h, **kw), None, None)),
            ("gru_cell", "workspace", lambda: gru_b(hx, hx, torch.randn(b, 3 * h, **kw))),
        ]
    if _has_op("rnn_cell_fused"):
        rnn, rnn_b = fused_op("rnn_cell_fused"), fused_op("rnn_cell_fused_backward")
        g1 = torch.randn(b, h, **kw)
        cases += [
            ("rnn_cell", "gates", lambda: rnn(g1, torch.randn(b, h + 1, **kw), None, None, False)),
            ("rnn_cell", "grad_hy|hy", lambda: rnn_b(g1, torch.randn(b, h + 1, **kw), False)),
        ]
    if not cases:
        pytest.skip("no fused convrnn cell op is registered yet")
    for op_re, arg_re, run in cases:
        with raises_named(op_re, arg_re):
            run()


def test_opcheck(device):
    _ck_or_skip()
    checked = 0
    for name, bname in [("lstm_cell_fused", "lstm_cell_fused_backward"), ("gru_cell_fused", "gru_cell_fused_backward"),
                        ("rnn_cell_fused", "rnn_cell_fused_backward")]:
        if not (_has_op(name) and _has_op(bname)):
            continue
        op, bop = getattr(torch.ops.convrnn, name), getattr(torch.ops.convrnn, bname)
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[name[:4].rstrip("_")]
        for bias in (True, False):
            gx, gh, bi, bh = (None if v is None else v.float().requires_grad_()
                              for v in _fused_inputs(gates, 3, 4, device, bias))
            hx = _rand(3, 4, seed=9, device=device, dtype=torch.float32).requires_grad_()
            g = _rand(3, 4, seed=10, device=device, dtype=torch.float32)
            if gates == 4:
                torch.library.opcheck(op.default, (gx, gh, hx, bi, bh))
                hy, cy, ws = (o.detach() for o in op(gx, gh, hx, bi, bh))
                for gh_, gc_ in [(g, g * 2), (g, None), (None, g)]:
                    torch.library.opcheck(bop.default, (gh_, gc_, hx.detach(), cy, ws))
            elif gates == 3:
                torch.library.opcheck(op.default, (gx, gh, hx, bi, bh))
                hy, ws = (o.detach() for o in op(gx, gh, hx, bi, bh))
                torch.library.opcheck(bop.default, (g, hx.detach(), ws))
            else:
                for relu in (False, True):
                    torch.library.opcheck(op.default, (gx, gh, bi, bh, relu))
                    hy = op(gx, gh, bi, bh, relu).detach()
                    torch.library.opcheck(bop.default, (g, hy, relu))
            checked += 1
    if not checked:
        pytest.skip("no fused convrnn cell op is registered yet")


def test_torch_compile_lstm_module(device):
    cls = module_cls(CELLS["lstm_cell"])
    torch._dynamo.reset()
    lstm = cls(3, 4).to(device)

    def model(xs, h, c):
        for x in xs:
            h, c = lstm(x, (h, c))
        return h * 2 + c

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    xs, h0, c0 = _rand(2, 2, 3, device=device, dtype=torch.float32, scale=1), \
        _rand(2, 4, seed=1, device=device, dtype=torch.float32, scale=1), \
        _rand(2, 4, seed=2, device=device, dtype=torch.float32, scale=1)
    leaves = [xs, h0, c0]
    results = []
    for f in (compiled, model):
        ins = [t.detach().requires_grad_() for t in leaves]
        out = f(*ins)
        grads = torch.autograd.grad(out, ins + list(lstm.parameters()), torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (eout, egrads) = results
    torch.testing.assert_close(out, eout, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, egrads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# ---- modules ----------------------------------------------------------------------------------

MODULE_CELLS = ["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"]


@pytest.mark.parametrize("name", MODULE_CELLS)
def test_module_signature(name):
    cell = CELLS[name]
    assert inspect.signature(module_cls(cell)) == inspect.signature(getattr(torch.nn, cell.module))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", MODULE_CELLS)
def test_module_matches_torch_nn(device, name, bias):
    cell = CELLS[name]
    cls, tcls = module_cls(cell), getattr(torch.nn, cell.module)
    ours_m = cls(5, 7, bias, device=device, **cell.module_kwargs)
    theirs = tcls(5, 7, bias=bias, device=device, **cell.module_kwargs)
    assert isinstance(ours_m, tcls)
    assert repr(ours_m) == repr(theirs)
    for attr in ("input_size", "hidden_size", "bias") + (("nonlinearity",) if cell.module == "RNNCell" else ()):
        assert getattr(ours_m, attr) == getattr(theirs, attr), attr
    sd, tsd = ours_m.state_dict(), theirs.state_dict()
    assert list(sd) == list(tsd) and all(sd[k].shape == tsd[k].shape and sd[k].dtype == tsd[k].dtype for k in sd)
    assert [n for n, _ in ours_m.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours_m.load_state_dict(tsd)
    for batch, with_hx in [((3,), True), ((3,), False), ((), True), ((), False), ((0,), True)]:
        x = _rand(*batch, 5, device=device, dtype=torch.float32, scale=1)
        hx = None
        if with_hx:
            h = _rand(*batch, 7, seed=1, device=device, dtype=torch.float32, scale=1)
            hx = (h, _rand(*batch, 7, seed=2, device=device, dtype=torch.float32, scale=1)) if cell.lstm else h
        what = f"batch {batch}, hx {'given' if with_hx else 'None'}"
        res = []
        for m in (ours_m, theirs):
            xl = x.detach().requires_grad_()
            out = m(xl, hx)
            outs = tuple(out) if cell.lstm else (out,)
            gouts = tuple(grad_output_like(o, 3 + j) for j, o in enumerate(outs))
            res.append((outs, torch.autograd.grad(outs, [xl, *m.parameters()], gouts)))
        (outs, grads), (eouts, egrads) = res
        for o, e in zip(outs, eouts):
            assert o.shape == e.shape, what
            torch.testing.assert_close(o, e, **CELL_TOL[torch.float32], msg=lambda m: f"{what}: {m}")
        for g, e in zip(grads, egrads):
            torch.testing.assert_close(g, e, **CELL_TOL[torch.float32], msg=lambda m: f"{what} grad: {m}")


@pytest.mark.parametrize("name", MODULE_CELLS)
def test_module_dtype_and_no_hx_default(device, name):
    cell = CELLS[name]
    m = module_cls(cell)(4, 3, dtype=torch.float64, device=device, **cell.module_kwargs)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    x = _rand(2, 4, device=device)
    zeros = torch.zeros(2, 3, dtype=torch.float64, device=device)
    out, expected = m(x), m(x, (zeros, zeros) if cell.lstm else zeros)
    for o, e in zip(out if cell.lstm else (out,), expected if cell.lstm else (expected,)):
        assert torch.equal(o, e)


# ---- whole-cell dispatcher ops (lstm_cell, gru_cell, rnn_cell and backward) -------------------
# The functionals above are these ops; here: the ops themselves (opcheck, the eager route and
# the dispatcher's registered autograd agree, partial gradients, the backward ops' masks).

WHOLE_OPS = {"lstm_cell": "lstm_cell", "gru_cell": "gru_cell", "rnn_tanh_cell": "rnn_cell",
             "rnn_relu_cell": "rnn_cell"}


def whole_op_args(cell, t, need_backward=True):
    """The op's arguments for the inputs t of make_cell_inputs (LSTM: h and c apart)."""
    states = [t["h"], t["c"]] if cell.lstm else [t["h"]]
    extra = {"gru_cell": [need_backward], "rnn_tanh_cell": [False], "rnn_relu_cell": [True]}.get(cell.name, [])
    return [t["input"], *states, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], *extra]


def whole_op(cell):
    return fused_op(WHOLE_OPS[cell.name]).default


@pytest.mark.parametrize("size", [(3, 5, 7), (None, 4, 6), (0, 3, 2)], ids=size_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_whole_op_opcheck(device, cell, size, bias):
    op = whole_op(cell)
    t = make_cell_inputs(cell, *size, torch.float32, device, bias)
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in whole_op_args(cell, t)]
    torch.library.opcheck(op, tuple(args))


@pytest.mark.parametrize("mask_id", ["all", "weights", "input", "states", "none_but_bias"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_whole_backward_op_opcheck(device, cell, mask_id, bias):
    op = whole_op(cell)
    bop = fused_op(WHOLE_OPS[cell.name] + "_backward").default
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device, bias)
    args = whole_op_args(cell, t)
    out = op(*args)
    n_states = 2 if cell.lstm else 1
    names = ["input"] + ["h", "c"][:n_states] + ["w_ih", "w_hh", "b_ih", "b_hh"]
    wanted = {"all": names, "weights": ["w_ih", "w_hh"], "input": ["input"], "states": ["h", "c"],
              "none_but_bias": ["b_ih", "b_hh"]}[mask_id]
    mask = [n in wanted and (bias or not n.startswith("b_")) for n in names]
    g = grad_output_like(t["h"], 5)
    x, states, w_ih, w_hh = t["input"], [t["h"], t["c"]][:n_states], t["w_ih"], t["w_hh"]
    if cell.lstm:
        hy, cy, ws = out
        cases = [(g, g * 0.5), (g, None), (None, g)]
        for gh, gc in cases:
            torch.library.opcheck(bop, (gh, gc, x, *states, w_ih, w_hh, cy, ws, mask))
    elif cell.name == "gru_cell":
        torch.library.opcheck(bop, (g, x, *states, w_ih, w_hh, out[1], mask))
    else:
        torch.library.opcheck(bop, (g, x, *states, w_ih, w_hh, out, cell.name == "rnn_relu_cell", mask))


@pytest.mark.parametrize("b", [3, 1, None], ids=["batch3", "batch1", "unbatched"])
@pytest.mark.parametrize("grads_of", ["all", "weights", "input", "states", "biases"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_partial(device, cell, grads_of, bias, b):
    """float64 gradcheck with only some arguments requiring grad (the backward op's mask); batch 1
    and unbatched inputs take the CPU's batch-1 products."""
    if grads_of == "biases" and not bias:
        pytest.skip("no biases")
    t = make_cell_inputs(cell, b, 4, 5, torch.float64, device, bias, seed=11)
    groups = {"all": NAMES, "weights": ["w_ih", "w_hh"], "input": ["input"], "states": ["h", "c"],
              "biases": ["b_ih", "b_hh"]}
    diff = [k for k in groups[grads_of] if t[k] is not None]
    fn = ours(cell)

    def f(*args):
        d = dict(t)
        d.update(zip(diff, args))
        return call(fn, cell, d)
    assert torch.autograd.gradcheck(f, [t[k].clone().requires_grad_() for k in diff])
    # and the gradients of the others are not computed at all
    leaves = {k: None if v is None else v.clone().requires_grad_(k in diff) for k, v in t.items()}
    out = call(fn, cell, leaves)
    sum(o.sum() for o in out).backward()
    for k, v in leaves.items():
        if v is not None and k not in diff:
            assert v.grad is None, f"{k} got a gradient it did not ask for"


@pytest.mark.parametrize("name", list(CELLS))
def test_eager_route_matches_dispatcher_route(device, name):
    """ck.<cell> (eager: the C++ twin of the op's OpFunction) and the bare op through the
    dispatcher (register_autograd, what torch.compile traces) give the same values and
    gradients, bit for bit."""
    cell = CELLS[name]
    ours(cell)
    op = whole_op(cell)
    t = make_cell_inputs(cell, 4, 6, 5, torch.float64, device, seed=4)
    results = []
    for route in ("eager", "dispatcher"):
        leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in t.items()}
        if route == "eager":
            outs = call(ours(cell), cell, leaves)
            # the eager node is the C++ twin (csrc/rnn_cells_autograd.cpp), not a Python node
            assert "CppNode" in outs[0].grad_fn.name(), outs[0].grad_fn.name()
        else:
            res = op(*whole_op_args(cell, leaves))
            outs = res[:2] if cell.lstm else (res[0],) if name == "gru_cell" else (res,)
            assert "CppNode" not in outs[0].grad_fn.name(), outs[0].grad_fn.name()
        names = [k for k in NAMES if leaves[k] is not None]
        gouts = tuple(grad_output_like(o, 9 + j) for j, o in enumerate(outs))
        grads = torch.autograd.grad(outs, [leaves[k] for k in names], gouts)
        results.append((outs, grads))
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gru_without_backward_saves_no_workspace(device):
    cell = CELLS["gru_cell"]
    op = whole_op(cell)
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device)
    hy, ws = op(*whole_op_args(cell, t, need_backward=False))
    hy2, ws2 = op(*whole_op_args(cell, t, need_backward=True))
    assert ws.numel() == 0 and ws2.shape == (3, 28)
    assert torch.equal(hy, hy2)
    with torch.no_grad():
        assert torch.equal(ours(cell)(t["input"], t["h"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"]), hy)


@pytest.mark.parametrize("size", [(64, 96, 80), (5, 300, 33), (1, 512, 256)], ids=size_id)
def test_thread_count_agrees(device, cell, size):
    """Large steps split their products over the threads (csrc/cpu/rnn_cell_products.cpp):
    1 and 2 threads agree to rounding and each is repeatable bit for bit."""
    t = make_cell_inputs(cell, *size, torch.float32, device, seed=2)
    runs = {}
    for n in (1, 2, 2):
        with num_threads(n):
            outs, grads, gouts = fwd_bwd(ours(cell), cell, t, runs.get("gouts"))
        runs.setdefault("gouts", gouts)
        if n in runs:
            for a, b in zip(outs + tuple(grads.values()), runs[n]):
                assert torch.equal(a, b), "two runs with 2 threads differ"
        runs[n] = outs + tuple(grads.values())
    for a, b in zip(runs[1], runs[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    check_against_torch(ours(cell), cell, t, f"{size_id(size)}", gouts=runs["gouts"], reference=False)


@pytest.mark.parametrize("size", [(1, 300, 70), (None, 600, 130), (1, 7, 5)], ids=size_id)
def test_batch1_bits_do_not_depend_on_threads(device, cell, size):
    """At batch 1 the CPU gate products run in fixed chunks of 64 weight rows, over the threads
    from 64K weight elements, the chunks' sums added in chunk order (cpu/rnn_cell_products.cpp):
    1, 2 and 3 threads give the same bits, forward and backward, and agree with torch.  The
    sizes: chunks split over the threads with a ragged last one (LSTM/GRU 300x70, all 600x130)
    and a step below the threshold."""
    if device != "cpu":
        pytest.skip("the thread count is the CPU's")
    t = make_cell_inputs(cell, *size, torch.float32, device, seed=4)
    runs, gouts = [], None
    for n in (1, 2, 3):
        with num_threads(n):
            outs, grads, gouts = fwd_bwd(ours(cell), cell, t, gouts)
        runs.append(outs + tuple(grads.values()))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "batch 1: the thread count changed the bits"
    check_against_torch(ours(cell), cell, t, f"{size_id(size)}", gouts=gouts)


@pytest.mark.parametrize("layout", ["column_slices", "transposed"])
def test_batch1_strided_weights(device, cell, layout):
    """Batch-1 products read the weights in place when their rows have unit stride (a leading
    dimension past the row: slices of wider matrices), else from a contiguous copy."""
    t = make_cell_inputs(cell, 1, 65, 40, torch.float32, device, seed=5)
    for k in ("w_ih", "w_hh"):
        w = t[k]
        if layout == "column_slices":
            wide = torch.zeros(w.shape[0], w.shape[1] + 9, dtype=w.dtype, device=w.device)
            wide[:, 3:3 + w.shape[1]] = w
            t[k] = wide[:, 3:3 + w.shape[1]]
        else:
            t[k] = w.t().contiguous().t()
        assert not t[k].is_contiguous()
    check_against_torch(ours(cell), cell, t, f"batch 1, {layout} weights")


@pytest.mark.parametrize("name", ["gru_cell", "rnn_tanh_cell", "rnn_relu_cell"])
def test_torch_compile_cell_module(device, name):
    """fullgraph compile of a step loop through the module; values and gradients as eager."""
    cell = CELLS[name]
    m = module_cls(cell)(3, 4, **cell.module_kwargs).to(device)
    torch._dynamo.reset()

    def model(xs, h):
        for x in xs:
            h = m(x, h)
        return h * 2

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    xs = _rand(2, 2, 3, device=device, dtype=torch.float32, scale=1)
    h0 = _rand(2, 4, seed=1, device=device, dtype=torch.float32, scale=1)
    results = []
    for f in (compiled, model):
        ins = [xs.detach().requires_grad_(), h0.detach().requires_grad_()]
        out = f(*ins)
        results.append((out, torch.autograd.grad(out, ins + list(m.parameters()), torch.ones_like(out))))
    (out, grads), (eout, egrads) = results
    torch.testing.assert_close(out, eout, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, egrads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_whole_backward_bad_arguments(device):
    kw = dict(device=device, dtype=torch.float32)
    cell = CELLS["lstm_cell"]
    t = make_cell_inputs(cell, 3, 5, 7, torch.float32, device)
    op, bop = whole_op(cell), fused_op("lstm_cell_backward").default
    hy, cy, ws = op(*whole_op_args(cell, t))
    mask = [True] * 7
    x, h, c, w_ih, w_hh = t["input"], t["h"], t["c"], t["w_ih"], t["w_hh"]
    with raises_named("lstm_cell_backward", "workspace"):
        bop(hy, cy, x, h, c, w_ih, w_hh, cy, ws[:, :-4], mask)
    with raises_named("lstm_cell_backward", "grad_hy"):
        bop(torch.randn(3, 8, **kw), cy, x, h, c, w_ih, w_hh, cy, ws, mask)
    with raises_named("lstm_cell_backward", r"\bcy\b"):
        bop(hy, cy, x, h, c, w_ih, w_hh, cy.double(), ws, mask)
    gru, gru_b = whole_op(CELLS["gru_cell"]), fused_op("gru_cell_backward").default
    tg = make_cell_inputs(CELLS["gru_cell"], 3, 5, 7, torch.float32, device)
    _, empty_ws = gru(*whole_op_args(CELLS["gru_cell"], tg, need_backward=False))
    with raises_named("gru_cell_backward", "workspace"):
        gru_b(tg["h"], tg["input"], tg["h"], tg["w_ih"], tg["w_hh"], empty_ws, [True] * 6)
