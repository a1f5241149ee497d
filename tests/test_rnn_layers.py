"""convrnn whole-sequence recurrent layers (nn.LSTM, nn.GRU, nn.RNN and the dispatcher ops
lstm_layer, gru_layer, rnn_layer with their backward ops) against torch.nn's modules with the
same weights and against reference_rnn.rnn_sequence: values and the gradients of the input,
hx (and cx) and every parameter over a grid of module options and input kinds (batch_first,
unbatched, PackedSequence sorted and unsorted, hx given or not), gradcheck, random sizes,
dtypes, determinism, dropout, bad input, opcheck and torch.compile.

Half precision follows helpers.py: with ref32 torch's float32 result, ours may be off by at
most 2x torch's own half error plus one ulp."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import BAD_INPUT_ERRORS, COMPILE_BACKEND, HALF_DTYPES, assert_half_ok, dtype_id, load_reference, \
    needs_cuda, num_threads


ref = load_reference("reference_rnn")
try:
    import convrnn_kernels as ck
    _CK_ERROR = None
except ImportError as e:  # not built yet: the reference tests still run
    ck, _CK_ERROR = None, str(e)

# name: (torch.nn class, constructor options, reference mode)
MODES = {
    "lstm": ("LSTM", {}, "LSTM"),
    "lstm_proj": ("LSTM", {"proj_size": 4}, "LSTM"),
    "gru": ("GRU", {}, "GRU"),
    "rnn_tanh": ("RNN", {}, "RNN_TANH"),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}, "RNN_RELU"),
}
# ours vs torch: the same arithmetic in another order (sequences accumulate a little more than cells)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=5e-5, atol=5e-5)}


@pytest.fixture(autouse=True)
def exact_float32():
    """torch's CUDA RNNs run cuDNN, which uses TF32 for float32 unless told not to; our steps'
    matrix products follow torch.backends.cuda.matmul (off by default).  Compare exact with exact."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old
T, B, I, H = 4, 3, 5, 6


def _ck_or_skip():
    if ck is None:
        pytest.skip(f"convrnn_kernels does not import: {_CK_ERROR}")
    if not hasattr(ck.nn, "LSTM"):
        pytest.skip("convrnn_kernels.nn.LSTM is not implemented yet")
    return ck


def make_pair(name, *, num_layers=1, bidirectional=False, batch_first=False, bias=True, dtype=torch.float64,
              input_size=I, hidden=H, dropout=0.0, device="cpu", seed=0, scale=2.5):
    """(ours, torch's) module with the same weights; weights scaled beyond torch's init range so
    that gates saturate as well as stay linear."""
    _ck_or_skip()
    cls, kw, _ = MODES[name]
    torch.manual_seed(seed)
    opts = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                dropout=dropout, **kw)
    theirs = getattr(torch.nn, cls)(input_size, hidden, **opts)
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(scale)
    theirs = theirs.to(dtype=dtype, device=device)
    ours = getattr(ck.nn, cls)(input_size, hidden, **opts).to(dtype=dtype, device=device)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def make_inputs(module, variant, dtype=torch.float64, device="cpu", t=T, b=B, seed=0):
    """{"x": input leaf, "h": h0, "c": c0 (LSTM), "lengths", "sorted"} for a variant."""
    lstm = isinstance(module, torch.nn.LSTM)
    d = 2 if module.bidirectional else 1
    p = module.proj_size if lstm and module.proj_size else module.hidden_size
    unbatched = variant == "unbatched"
    xs = (t, module.input_size) if unbatched else ((b, t) if module.batch_first else (t, b)) + (module.input_size,)
    hb = () if unbatched else (b,)
    inputs = {"x": _rand(xs, dtype, device, seed)}
    if variant not in ("no_hx", "packed_no_hx"):
        inputs["h"] = _rand((module.num_layers * d,) + hb + (p,), dtype, device, seed + 1, 0.8)
        if lstm:
            inputs["c"] = _rand((module.num_layers * d,) + hb + (module.hidden_size,), dtype, device, seed + 2)
    if variant.startswith("packed"):
        inputs["lengths"] = [t, t - 1, 1][:b] if variant == "packed_sorted" else [2, t, 1][:b]
        inputs["sorted"] = variant == "packed_sorted"
    return inputs


def run(module, inputs, grads=None, seed=5):
    """Forward and backward: ({name: output}, {name: gradient}, grad_outputs).  Gradients of the
    input, h0, c0 and every parameter (by name)."""
    leaves = {k: inputs[k].detach().requires_grad_() for k in ("x", "h", "c") if k in inputs}
    x = leaves["x"]
    if "lengths" in inputs:
        x = pack_padded_sequence(x, inputs["lengths"], batch_first=module.batch_first,
                                 enforce_sorted=inputs["sorted"])
    hx = None
    if "h" in leaves:
        hx = (leaves["h"], leaves["c"]) if "c" in leaves else leaves["h"]
    out, hn = module(x, hx)
    outs = {"output": out.data if "lengths" in inputs else out}
    if "lengths" in inputs:
        outs["batch_sizes"] = out.batch_sizes
        outs["unsorted_indices"] = out.unsorted_indices
    if isinstance(hn, tuple):
        outs["h_n"], outs["c_n"] = hn
    else:
        outs["h_n"] = hn
    diff = {k: v for k, v in outs.items() if v is not None and v.is_floating_point()}
    if grads is None:
        grads = {k: _rand(v.shape, v.dtype, v.device, seed + j) for j, (k, v) in enumerate(sorted(diff.items()))}
    wrt = dict(leaves)
    wrt.update(dict(module.named_parameters()))
    got = torch.autograd.grad([diff[k] for k in sorted(diff)], list(wrt.values()), [grads[k] for k in sorted(diff)],
                              allow_unused=True)
    return outs, dict(zip(wrt, got)), grads


def compare(ours, theirs, inputs, what, tol=None):
    """Values and gradients of ours vs torch's module on the same inputs."""
    outs, grads, gouts = run(ours, inputs)
    touts, tgrads, _ = run(theirs, inputs, gouts)
    dtype = inputs["x"].dtype
    tol = tol or TOL[dtype]
    assert outs.keys() == touts.keys(), what
    for k in outs:
        if outs[k] is None:
            assert touts[k] is None, f"{what}: {k}"
        elif not outs[k].is_floating_point():
            assert torch.equal(outs[k], touts[k]), f"{what}: {k}"
        else:
            assert outs[k].shape == touts[k].shape and outs[k].dtype == touts[k].dtype, f"{what}: {k}"
            torch.testing.assert_close(outs[k], touts[k], **tol, msg=lambda m: f"{what} {k}: {m}")
    assert grads.keys() == tgrads.keys()
    for k in grads:
        assert grads[k] is not None and tgrads[k] is not None, f"{what}: no gradient of {k}"
        torch.testing.assert_close(grads[k], tgrads[k], **tol, msg=lambda m: f"{what} grad {k}: {m}")
    return outs, grads


# ---- the reference itself (runs without the extension) -----------------------------------------

def _weights_of(module):
    d = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for direction in range(d):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            out.append(tuple(getattr(module, n + sfx, None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                      "weight_hr")))
    return out


@pytest.mark.parametrize("lengths", [None, [4, 2, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("name", list(MODES))
def test_reference_matches_torch(name, lengths):
    cls, kw, mode = MODES[name]
    torch.manual_seed(0)
    m = getattr(torch.nn, cls)(I, H, num_layers=2, bidirectional=True, **kw).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    p = kw.get("proj_size") or H
    h0 = torch.randn(4, B, p, dtype=torch.float64)
    hx = (h0, torch.randn(4, B, H, dtype=torch.float64)) if mode == "LSTM" else h0
    out, hn = ref.rnn_sequence(mode, x, hx, _weights_of(m), num_layers=2, bidirectional=True, lengths=lengths)
    if lengths is None:
        eout, ehn = m(x, hx)
    else:
        packed, ehn = m(pack_padded_sequence(x, lengths), hx)
        eout = torch.nn.utils.rnn.pad_packed_sequence(packed, total_length=T)[0]
    torch.testing.assert_close(out, eout, **TOL[torch.float64])
    for a, e in zip(hn if mode == "LSTM" else (hn,), ehn if mode == "LSTM" else (ehn,)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


# ---- the grid: ours vs torch, values and every gradient ------------------------------------------

VARIANTS = ["plain", "batch_first", "nobias", "no_hx", "unbatched", "packed_sorted", "packed_unsorted", "packed_no_hx"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["1layer", "2layers"])
@pytest.mark.parametrize("name", list(MODES))
def test_matches_torch(device, name, num_layers, bidirectional, variant):
    ours, theirs = make_pair(name, num_layers=num_layers, bidirectional=bidirectional,
                             batch_first=variant == "batch_first", bias=variant != "nobias", device=device)
    inputs = make_inputs(ours, variant, device=device)
    outs, _ = compare(ours, theirs, inputs, f"{name} {num_layers} layers bi={bidirectional} {variant}")
    d = 2 if bidirectional else 1
    p = ours.proj_size if name == "lstm_proj" else H
    if variant == "unbatched":
        assert outs["output"].shape == (T, d * p) and outs["h_n"].shape == (num_layers * d, p)
    elif not variant.startswith("packed"):
        assert outs["output"].shape == ((B, T) if variant == "batch_first" else (T, B)) + (d * p,)
        assert outs["h_n"].shape == (num_layers * d, B, p)
    if "c_n" in outs:
        assert outs["c_n"].shape == outs["h_n"].shape[:-1] + (H,)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("name", list(MODES))
def test_float32_larger(device, name, bidirectional):
    ours, theirs = make_pair(name, num_layers=2, bidirectional=bidirectional, dtype=torch.float32, input_size=9,
                             hidden=16, device=device, scale=1.5)
    # On CUDA torch runs cuDNN's RNN, which sums in its own blocked order: with these saturating
    # weights (scale 1.5) its float32 weight gradients differ from ours (and from torch's CPU,
    # which ours matches to 5e-5) by up to ~1.3e-4 (seen on an H200, 2026-11-25).
    tol = dict(rtol=5e-4, atol=5e-4) if device == "cuda" else None
    compare(ours, theirs, make_inputs(ours, "plain", torch.float32, device, t=7, b=5), f"{name} float32", tol)
    compare(ours, theirs, make_inputs(ours, "packed_unsorted", torch.float32, device, t=7, b=3),
            f"{name} float32 packed", tol)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference(device, name):
    """Ours vs the equations (reference_rnn.rnn_sequence), padded lengths and all gradients of x."""
    _, _, mode = MODES[name]
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, device=device)
    inputs = make_inputs(ours, "packed_sorted", device=device)
    x = inputs["x"].detach().requires_grad_()
    hx = (inputs["h"], inputs["c"]) if mode == "LSTM" else inputs["h"]
    packed, hn = ours(pack_padded_sequence(x, inputs["lengths"]), hx)
    out = torch.nn.utils.rnn.pad_packed_sequence(packed, total_length=T)[0]
    xr = inputs["x"].detach().requires_grad_()
    eout, ehn = ref.rnn_sequence(mode, xr, hx, _weights_of(ours), num_layers=2, bidirectional=True,
                                 lengths=inputs["lengths"])
    torch.testing.assert_close(out, eout, **TOL[torch.float64])
    for a, e in zip(hn if mode == "LSTM" else (hn,), ehn if mode == "LSTM" else (ehn,)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])
    g = _rand(out.shape, out.dtype, device, 9)
    (gx,), (egx,) = torch.autograd.grad(out, [x], g), torch.autograd.grad(eout, [xr], g)
    torch.testing.assert_close(gx, egx, **TOL[torch.float64])


@pytest.mark.parametrize("variant", ["plain", "packed_unsorted"])
@pytest.mark.parametrize("name", list(MODES))
def test_gradcheck(device, name, variant):
    """float64 gradcheck through input, h0, c0 and every parameter (2 bidirectional layers)."""
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, input_size=3, hidden=5, device=device, scale=1.5)
    inputs = make_inputs(ours, variant, device=device, t=3, b=3)
    names = [n for n, _ in ours.named_parameters()]
    leaves = [inputs[k] for k in ("x", "h", "c") if k in inputs]

    def f(*args):
        x, h = args[0], args[1]
        c = args[2] if "c" in inputs else None
        params = dict(zip(names, args[len(leaves):]))
        if "lengths" in inputs:
            x = pack_padded_sequence(x, inputs["lengths"], enforce_sorted=False)
        out, hn = torch.func.functional_call(ours, params, (x, (h, c) if c is not None else h))
        out = out.data if "lengths" in inputs else out
        return (out,) + (hn if isinstance(hn, tuple) else (hn,))
    args = [t.detach().requires_grad_() for t in leaves + [p for _, p in ours.named_parameters()]]
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@given(name=st.sampled_from(list(MODES)), t=st.integers(1, 5), b=st.integers(1, 4), i=st.integers(1, 6),
       h=st.integers(5, 8), num_layers=st.integers(1, 2), bidirectional=st.booleans(), packed=st.booleans(),
       seed=st.integers(0, 100))
@settings(max_examples=max(1, settings.default.max_examples * 3 // 5))
def test_random_sizes(name, t, b, i, h, num_layers, bidirectional, packed, seed):
    ours, theirs = make_pair(name, num_layers=num_layers, bidirectional=bidirectional, input_size=i, hidden=h,
                             seed=seed)
    inputs = make_inputs(ours, "plain", t=t, b=b, seed=seed)
    if packed:
        g = torch.Generator().manual_seed(seed)
        inputs["lengths"] = torch.randint(1, t + 1, (b,), generator=g).tolist()
        inputs["sorted"] = False
    compare(ours, theirs, inputs, f"random {name} T{t} B{b} I{i} H{h} L{num_layers} bi={bidirectional}")


# ---- half precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(MODES))
def test_half_types(device, name, dtype):
    ours, theirs = make_pair(name, num_layers=2, bidirectional=True, dtype=dtype, hidden=8, device=device, scale=1.0)
    _, ref32 = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, hidden=8, device=device,
                         scale=1.0)
    ref32.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    inputs = make_inputs(ours, "packed_unsorted", dtype, device, t=6, b=3)
    outs, grads, gouts = run(ours, inputs)
    touts, tgrads, _ = run(theirs, inputs, gouts)
    inputs32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    routs, rgrads, _ = run(ref32, inputs32, {k: v.float() for k, v in gouts.items()})
    for k in ("output", "h_n", "c_n"):
        if k in outs:
            assert_half_ok(outs[k], touts[k], routs[k], f"{name} {k}")
    for k in grads:
        assert_half_ok(grads[k], tgrads[k], rgrads[k], f"{name} grad {k}")


# ---- determinism and dropout ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_deterministic(device, name):
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=16, hidden=32,
                        device=device, scale=1.0)
    inputs = make_inputs(ours, "packed_unsorted", torch.float32, device, t=9, b=3)
    with num_threads(2):
        assert_runs_identical(ours, inputs)


def assert_runs_identical(module, inputs):
    """Two runs of forward+backward give the same bits in every output and gradient."""
    o1, g1, gouts = run(module, inputs)
    o2, g2, _ = run(module, inputs, gouts)
    for k in o1:
        assert torch.equal(o1[k], o2[k]), f"{k} differs between two runs"
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad {k} differs between two runs"


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu"])
def test_dropout(device, name):
    """dropout > 0 acts between layers in training only, deterministically under a fixed seed."""
    ours, theirs = make_pair(name, num_layers=3, dropout=0.5, dtype=torch.float32, device=device)
    inputs = make_inputs(ours, "plain", torch.float32, device)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(run(ours, inputs))
    (o1, g1, _), (o2, g2, _) = runs
    for k in o1:
        assert torch.equal(o1[k], o2[k]), f"{k} differs under one seed"
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"grad {k} differs under one seed"
    ours.eval()
    theirs.eval()
    o_eval, _, _ = run(ours, inputs)
    assert not torch.equal(o1["output"], o_eval["output"]), "dropout had no effect in training"
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN has no backward in eval mode
        compare(ours, theirs, inputs, f"{name} eval with dropout=0.5", TOL[torch.float32])


# ---- modules: drop-in properties ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODES))
def test_module_is_drop_in(name):
    ours, theirs = make_pair(name, num_layers=2, bidirectional=True)
    cls = MODES[name][0]
    assert isinstance(ours, getattr(torch.nn, cls))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


def test_lstm_only_c_n_used(device):
    """Only c_n reaches the loss: the backward gets no gradient for output and h_n."""
    ours, theirs = make_pair("lstm_proj", num_layers=2, device=device)
    inputs = make_inputs(ours, "plain", device=device)
    results = []
    for m in (ours, theirs):
        x = inputs["x"].detach().requires_grad_()
        _, (_, c) = m(x, (inputs["h"], inputs["c"]))
        results.append(torch.autograd.grad(c.sum(), [x] + list(m.parameters()), allow_unused=True))
    for g, e in zip(*results):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, **TOL[torch.float64])


# ---- bad input ----------------------------------------------------------------------------------------

OP_RE = {"lstm": "lstm", "lstm_proj": "lstm", "gru": "gru", "rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu"}


def raises_named(op, arg):
    return pytest.raises(BAD_INPUT_ERRORS, match=rf"(?s)convrnn\.{op}\b.*{arg}")


BAD_CASES = ["input_features", "input_4d", "input_int", "hx_batch", "hx_hidden", "hx_layers", "hx_dtype", "cx_shape",
             "hx_3d_unbatched", "weight_hh_rows", "weight_ih_dtype", "bias_size", "num_layers_0", "input_no_steps",
             "input_no_steps_unbatched", "cx_none"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("name", list(MODES))
def test_bad_module_input(name, case):
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32)
    lstm = name.startswith("lstm")
    if case in ("cx_shape", "cx_none") and not lstm:
        pytest.skip("no cx")
    inputs = make_inputs(ours, "plain", torch.float32)
    x, h, c = inputs["x"], inputs["h"], inputs.get("c")
    arg = {"input_features": "input", "input_4d": "input", "input_int": "input", "hx_batch": "hx",
           "hx_hidden": "hx", "hx_layers": "hx", "hx_dtype": "hx", "cx_shape": "cx", "hx_3d_unbatched": "hx",
           "weight_hh_rows": "weight_hh_l0", "weight_ih_dtype": "weight_ih_l1", "bias_size": "bias_hh_l0_reverse",
           "num_layers_0": "num_layers", "input_no_steps": "input.*sequence length",
           "input_no_steps_unbatched": "input.*sequence length", "cx_none": "cx"}[case]
    if case == "input_features":
        x = torch.randn(T, B, I + 1)
    elif case == "input_4d":
        x = x.unsqueeze(0)
    elif case == "input_int":
        x = x.long()
    elif case == "hx_batch":
        h = torch.randn(h.shape[0], B + 1, h.shape[2])
    elif case == "hx_hidden":
        h = torch.randn(h.shape[0], B, h.shape[2] + 1)
    elif case == "hx_layers":
        h = torch.randn(h.shape[0] + 1, B, h.shape[2])
    elif case == "hx_dtype":
        h = h.double()
    elif case == "cx_shape":
        c = torch.randn(c.shape[0], B, H + 1)
    elif case == "hx_3d_unbatched":
        x = x[:, 0]
    elif case == "weight_hh_rows":
        ours.weight_hh_l0 = torch.nn.Parameter(torch.randn(ours.weight_hh_l0.shape[0] - H, ours.weight_hh_l0.shape[1]))
    elif case == "weight_ih_dtype":
        ours.weight_ih_l1 = torch.nn.Parameter(ours.weight_ih_l1.double())
    elif case == "bias_size":
        ours.bias_hh_l0_reverse = torch.nn.Parameter(torch.randn(ours.bias_hh_l0_reverse.shape[0] + 1))
    elif case == "num_layers_0":
        ours.num_layers = 0
    elif case == "input_no_steps":  # torch: "Expected sequence length to be larger than 0 in RNN"
        x = x[:0]
    elif case == "input_no_steps_unbatched":
        x, h, c = x[:0, 0], h[:, 0], None if c is None else c[:, 0]
    elif case == "cx_none":
        c = None
    with raises_named(OP_RE[name], arg):
        ours(x, (h, c) if lstm else h)


@pytest.mark.parametrize("kwargs", [dict(num_layers=0), dict(proj_size=6), dict(proj_size=-1)],
                         ids=["num_layers_0", "proj_size_ge_hidden", "proj_size_negative"])
def test_bad_constructor_as_torch(kwargs):
    """torch's constructor raises for these already: ours raises the same error."""
    _ck_or_skip()
    with pytest.raises(ValueError) as theirs:
        torch.nn.LSTM(I, H, **kwargs)
    with pytest.raises(ValueError) as ours:
        ck.nn.LSTM(I, H, **kwargs)
    assert str(ours.value) == str(theirs.value)


def _op_args(op, device="cpu", dtype=torch.float32, h=H, b=B, t=T, proj=0, packed=False, bias=True):
    """Valid arguments of a layer op (a dict in schema order)."""
    g = {"lstm_layer": 4, "gru_layer": 3, "rnn_layer": 1}[op]
    p = proj or h
    n = 6 if packed else t * b
    args = {"x_proj": torch.randn((n, g * h) if packed else (t, b, g * h), dtype=dtype, device=device),
            "h0": torch.randn(b, p, dtype=dtype, device=device)}
    if op == "lstm_layer":
        args["c0"] = torch.randn(b, h, dtype=dtype, device=device)
    args["w_hh"] = torch.randn(g * h, p, dtype=dtype, device=device) * 0.3
    args["b_ih"] = torch.randn(g * h, dtype=dtype, device=device) if bias else None
    args["b_hh"] = torch.randn(g * h, dtype=dtype, device=device) if bias else None
    if op == "lstm_layer":
        args["w_hr"] = torch.randn(p, h, dtype=dtype, device=device) * 0.3 if proj else None
    args["batch_sizes"] = torch.tensor([3, 2, 1]) if packed else None
    args["reverse"] = False
    if op == "rnn_layer":
        args["relu"] = False
    return args


OP_BAD = {  # id: (op, argument, replacement maker, regex for the argument in the message)
    "x_proj_cols": ("lstm_layer", "x_proj", lambda a: a["x_proj"][..., :-1], "x_proj"),
    "x_proj_2d": ("gru_layer", "x_proj", lambda a: a["x_proj"][0], "x_proj"),
    "h0_batch": ("lstm_layer", "h0", lambda a: a["h0"][:-1], "h0"),
    "h0_hidden": ("gru_layer", "h0", lambda a: torch.randn(B, H + 1), "h0"),
    "c0_shape": ("lstm_layer", "c0", lambda a: torch.randn(B, H + 1), "c0"),
    "w_hh_rows": ("rnn_layer", "w_hh", lambda a: torch.randn(2 * H + 1, H), "w_hh"),
    "w_hh_gru_rows": ("gru_layer", "w_hh", lambda a: torch.randn(4 * H, H), "w_hh|x_proj"),
    "w_hr_shape": ("lstm_layer", "w_hr", lambda a: torch.randn(3, H + 1), "w_hr"),
    "b_ih_alone": ("lstm_layer", "b_hh", lambda a: None, "b_ih"),
    "b_hh_size": ("gru_layer", "b_hh", lambda a: torch.randn(3 * H + 2), "b_hh"),
    "h0_dtype": ("lstm_layer", "h0", lambda a: a["h0"].double(), "h0"),
    "w_hh_dtype": ("rnn_layer", "w_hh", lambda a: a["w_hh"].double(), "w_hh"),
    "x_proj_int": ("gru_layer", "x_proj", lambda a: a["x_proj"].long(), "x_proj"),
    "batch_sizes_increasing": ("lstm_layer", "batch_sizes", lambda a: torch.tensor([1, 2, 3]), "batch_sizes"),
    "batch_sizes_sum": ("gru_layer", "batch_sizes", lambda a: torch.tensor([3, 2, 2]), "batch_sizes|x_proj"),
    "batch_sizes_dtype": ("rnn_layer", "batch_sizes", lambda a: torch.tensor([3., 2., 1.]), "batch_sizes"),
}


@pytest.mark.parametrize("case", list(OP_BAD))
def test_bad_op_arguments(case):
    _ck_or_skip()
    op, arg, make, arg_re = OP_BAD[case]
    args = _op_args(op, packed=case.startswith("batch_sizes"))
    args[arg] = make(args)
    with pytest.raises(BAD_INPUT_ERRORS, match=rf"(?s)convrnn\.{op}\b.*(?:{arg_re})"):
        getattr(torch.ops.convrnn, op)(*args.values())


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_tensors_on_different_devices(name):
    ours, _ = make_pair(name, dtype=torch.float32, device="cuda")
    inputs = make_inputs(ours, "plain", torch.float32, "cuda")
    h = inputs["h"].cpu()
    with raises_named(OP_RE[name], "hx"):
        ours(inputs["x"], (h, inputs["c"]) if name == "lstm" else h)


# ---- opcheck and torch.compile ---------------------------------------------------------------------------

OPCHECK_CASES = [("lstm_layer", {}), ("lstm_layer", {"proj": 4, "packed": True}), ("gru_layer", {"packed": True}),
                 ("gru_layer", {"bias": False}), ("rnn_layer", {}), ("rnn_layer", {"packed": True})]


@pytest.mark.parametrize("op,opts", OPCHECK_CASES, ids=[f"{o}-{'-'.join(map(str, k.items()))}" for o, k in OPCHECK_CASES])
def test_opcheck(device, op, opts):
    _ck_or_skip()
    args = _op_args(op, device, **opts)
    args["reverse"] = bool(opts.get("packed"))
    args = {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in args.items()}
    fwd = getattr(torch.ops.convrnn, op)
    torch.library.opcheck(fwd.default, tuple(args.values()))
    with torch.no_grad():
        res = [r.detach() for r in fwd(*args.values())]
    det = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    g_out, g_hn = torch.randn_like(res[0]), torch.randn_like(res[1])
    bwd = getattr(torch.ops.convrnn, op + "_backward")
    if op == "lstm_layer":
        bargs = (g_out, g_hn, torch.randn_like(res[2]), det["h0"], det["c0"], det["w_hh"], det["w_hr"], res[0], res[3],
                 res[4], res[5], det["batch_sizes"], det["reverse"])
    elif op == "gru_layer":
        bargs = (g_out, g_hn, det["h0"], det["w_hh"], res[0], res[2], det["batch_sizes"], det["reverse"])
    else:
        bargs = (g_out, g_hn, det["h0"], det["w_hh"], res[0], det["batch_sizes"], det["reverse"], det["relu"])
    torch.library.opcheck(bwd.default, bargs)
    torch.library.opcheck(bwd.default, (None,) + bargs[1:])


@pytest.mark.parametrize("op,opts", [("lstm_layer", {"proj": 4, "packed": True}), ("gru_layer", {})])
def test_need_backward_false(device, op, opts):
    """need_backward=False (inference): the same output and final states, nothing saved; asking
    for a gradient then is an error naming the op."""
    _ck_or_skip()
    args = _op_args(op, device, **opts)
    fwd = getattr(torch.ops.convrnn, op)
    full, lean = fwd(*args.values(), True), fwd(*args.values(), False)
    n_states = 3 if op == "lstm_layer" else 2
    for a, b in zip(full[:n_states], lean[:n_states]):
        assert torch.equal(a, b)
    assert all(t.shape == (0, 0) for t in lean[n_states:])
    torch.library.opcheck(fwd.default, tuple(args.values()) + (False,))
    args["x_proj"].requires_grad_()
    with raises_named(op, "need_backward"):
        fwd(*args.values(), False)


@pytest.mark.parametrize("name", ["lstm"])
def test_torch_compile_module(device, name):
    """fullgraph compile of a model using the module (unpacked input: PackedSequence's
    int(batch_sizes[0]) is data-dependent).  Dynamo refuses every subclass of torch.nn.RNN,
    GRU and LSTM unless torch._dynamo.config.allow_rnn is set; with it, it traces our forward."""
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, device=device, scale=1.0)
    head = torch.nn.Linear(2 * H, 1).to(device)
    torch._dynamo.reset()

    def model(x):
        out, _ = ours(x)
        return head(out).sum(0)

    with torch._dynamo.config.patch(allow_rnn=True):
        _compile_and_compare(model, list(ours.parameters()), device)


def test_torch_compile_functional(device):
    """The layer ops in a fullgraph-compiled function without the module (no allow_rnn needed)."""
    _ck_or_skip()
    from convrnn_kernels.ops.rnn_layers import run_layers
    ours, _ = make_pair("gru", dtype=torch.float32, device=device, scale=1.0)
    weights = _weights_of(ours)
    torch._dynamo.reset()

    def model(x):
        h = x.new_zeros(1, B, H)
        out, h_n, _ = run_layers("GRU", x, h, None, weights, batch_sizes=None, num_layers=1, bidirectional=False,
                                   dropout=0.0, training=False)
        return out.sum(0) + h_n[-1] * 2

    _compile_and_compare(model, list(ours.parameters()), device)


def _compile_and_compare(model, params, device):
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    x0 = _rand((T, B, I), torch.float32, device, 3)
    results = []
    for f in (compiled, model):
        x = x0.clone().requires_grad_()
        out = f(x)
        grads = torch.autograd.grad(out.sum(), [x] + params)
        results.append((out, grads))
    (out, grads), (eout, egrads) = results
    torch.testing.assert_close(out, eout, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, egrads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ---- convrnn::rnn_stack: a unidirectional stack for inference --------------------------------------------

STACK_CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


def _stack_args(module, x):
    """rnn_stack's arguments for torch.nn module `module` (unidirectional, no projection) on x."""
    name = {"LSTM": 0, "GRU": 1}.get(type(module).__name__, 3 if getattr(module, "nonlinearity", "") == "relu" else 2)
    layers = module.num_layers
    get = lambda n: getattr(module, n, None)  # noqa: E731
    w = lambda n: None if get(n) is None else get(n).detach()  # noqa: E731
    return [torch.nn.functional.linear(x, w("weight_ih_l0")), None, None,
            [w(f"weight_ih_l{l}") for l in range(1, layers)], [w(f"weight_hh_l{l}") for l in range(layers)],
            [w(f"bias_ih_l{l}") for l in range(layers)], [w(f"bias_hh_l{l}") for l in range(layers)], name]


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(STACK_CELLS))
def test_rnn_stack_matches_torch(device, name, bias, layers):
    """The op against torch.nn's module in eval mode: the last layer's output, h_n, c_n (on CUDA
    the stacked persistent kernel where it serves the case, else each layer's op)."""
    _ck_or_skip()
    _, theirs = make_pair(name, num_layers=layers, bias=bias, dtype=torch.float32, device=device)
    inputs = make_inputs(theirs, "plain", torch.float32, device)
    args = _stack_args(theirs, inputs["x"])
    args[1], args[2] = inputs["h"], inputs.get("c")
    with torch.no_grad():
        out, h_n, c_n = torch.ops.convrnn.rnn_stack(*args)
        ref = theirs(inputs["x"], (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"])
    tol = dict(rtol=2e-4, atol=2e-4) if device == "cuda" else TOL[torch.float32]
    torch.testing.assert_close(out, ref[0], **tol)
    torch.testing.assert_close(h_n, ref[1][0] if name == "lstm" else ref[1], **tol)
    if name == "lstm":
        torch.testing.assert_close(c_n, ref[1][1], **tol)
    else:
        assert c_n.numel() == 0


def test_rnn_stack_opcheck_and_compile(device):
    _ck_or_skip()
    _, theirs = make_pair("lstm", num_layers=2, dtype=torch.float32, device=device)
    inputs = make_inputs(theirs, "plain", torch.float32, device)
    args = _stack_args(theirs, inputs["x"])
    args[1], args[2] = inputs["h"], inputs["c"]
    torch.library.opcheck(torch.ops.convrnn.rnn_stack.default, tuple(args))
    with torch.no_grad():
        eager = torch.ops.convrnn.rnn_stack(*args)
        compiled = torch.compile(lambda *a: torch.ops.convrnn.rnn_stack(*a), backend=COMPILE_BACKEND,
                                 fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_rnn_stack_refuses_gradients():
    _ck_or_skip()
    _, theirs = make_pair("gru", num_layers=2, dtype=torch.float32)
    inputs = make_inputs(theirs, "plain", torch.float32)
    args = _stack_args(theirs, inputs["x"])
    args[1] = inputs["h"].requires_grad_()
    with pytest.raises(RuntimeError, match=r"convrnn\.rnn_stack: .*no backward"):
        torch.ops.convrnn.rnn_stack(*args)


STACK_BAD = {  # id: (index in the arguments, replacement maker, regex for the argument in the message)
    "cell": (7, lambda a: 4, "cell"),
    "x_proj_cols": (0, lambda a: a[0][..., :-1], "x_proj"),
    "x_proj_2d": (0, lambda a: a[0][0], "x_proj"),
    "x_proj_int": (0, lambda a: a[0].long(), "x_proj"),
    "hx_layers": (1, lambda a: a[1][:1], "hx"),
    "hx_dtype": (1, lambda a: a[1].double(), "hx"),
    "cx_missing": (2, lambda a: None, "cx"),
    "w_ih_count": (3, lambda a: [], "w_ih"),
    "w_ih_shape": (3, lambda a: [torch.randn(4 * H, H + 1)], r"w_ih\[0\]"),
    "w_hh_shape": (4, lambda a: [a[4][0], torch.randn(4 * H, H + 1)], r"w_hh\[1\]"),
    "w_hh_none": (4, lambda a: [], "w_hh"),
    "b_count": (5, lambda a: a[5][:1], "b_ih"),
    "b_alone": (5, lambda a: [a[5][0], None], r"b_ih\[1\]"),
    "b_size": (6, lambda a: [a[6][0], torch.randn(4 * H + 1)], r"b_hh\[1\]"),
}


@pytest.mark.parametrize("case", list(STACK_BAD))
def test_rnn_stack_bad_arguments(case):
    _ck_or_skip()
    _, theirs = make_pair("lstm", num_layers=2, dtype=torch.float32)
    inputs = make_inputs(theirs, "plain", torch.float32)
    args = _stack_args(theirs, inputs["x"])
    args[1], args[2] = inputs["h"], inputs["c"]
    index, make, arg_re = STACK_BAD[case]
    args[index] = make(args)
    with pytest.raises(BAD_INPUT_ERRORS, match=rf"(?s)convrnn\.rnn_stack\b.*(?:{arg_re})"):
        torch.ops.convrnn.rnn_stack(*args)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_modules_take_the_stack_only_for_cuda_inference(device, name, monkeypatch):
    """nn.LSTM/GRU hand a unidirectional stack to rnn_stack on CUDA without a gradient (the
    results match torch either way); with a gradient, on the CPU, or bidirectional they run the
    layer ops."""
    _ck_or_skip()
    import convrnn_kernels.ops.rnn_layers as layers
    calls = []
    real = layers._stack_serves
    monkeypatch.setattr(layers, "_stack_serves", lambda *a: calls.append(real(*a)) or calls[-1])
    for bidirectional in (False, True):
        ours, theirs = make_pair(name, num_layers=2, bidirectional=bidirectional, dtype=torch.float32, device=device)
        inputs = make_inputs(ours, "plain", torch.float32, device)
        hx = (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"]
        with torch.no_grad():
            got, want = ours(inputs["x"], hx), theirs(inputs["x"], hx)
        torch.testing.assert_close(got[0], want[0], rtol=2e-4, atol=2e-4)
        ours(inputs["x"], hx)  # parameters require grad: the layer ops
    assert calls == [device == "cuda", False, False, False]
