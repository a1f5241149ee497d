"""The CPU layer recurrence (csrc/cpu/rnn_recurrence.cpp): on by default for float32 and float64
LSTM (without a projection), GRU and vanilla RNN layers (torch.ops.convrnn._cpu_recurrence(0) turns
it off, 2 splits every step over the hidden units whatever its size, 3 splits the forward and the
backward over the batch's rows from 2 rows a task).  Against our own step loop (the same
formulas, other products) and torch.nn's modules, forward and every gradient, over packed input in
both directions, batch 1, odd and split hidden sizes, 1 to 3 threads; float64 gradcheck through
the split path; determinism; inference (no workspace written); what it declines.  Every test
that means the recurrence to run checks its run counter, so a silent fall-back to the step loop
cannot pass for it."""
import pytest
import torch

from helpers import num_threads
from test_cpu_gemm import kernel_serves
from test_rnn_layers import TOL, assert_runs_identical, compare, make_inputs, make_pair, run  # noqa: F401

OPS = torch.ops.convrnn


class recurrence_mode:
    """Sets the CPU recurrence's mode inside the block; .runs counts the layer calls (forward or
    backward, per layer and direction) it ran."""

    def __init__(self, mode=1):
        self.mode = mode

    def __enter__(self):
        self.before, self.start = OPS._cpu_recurrence(self.mode)
        return self

    def __exit__(self, *exc):
        _, end = OPS._cpu_recurrence(self.before)
        self.runs = end - self.start


def step_loop_and_recurrence(module, inputs, mode, threads):
    with num_threads(threads):
        with recurrence_mode(0) as off:
            outs, grads, gouts = run(module, inputs)
        with recurrence_mode(mode) as on:
            routs, rgrads, _ = run(module, inputs, gouts)
    assert off.runs == 0
    return (outs, grads), (routs, rgrads), on.runs


# (T, B, I, H): batch 1; odd H (one task, or 16-unit tasks with a ragged last one); the
# training benchmark's batch and hidden size (split over the threads in mode 1 too)
SHAPES = {"B1_H9": (5, 1, 4, 9), "B5_H37": (6, 5, 3, 37), "B32_H64": (4, 32, 7, 64), "B7_H130": (3, 7, 5, 130)}
NAMES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


# (mode, threads): auto, the units' split and the rows' split (one thread: the same as auto)
MODES = [(m, t) for m in (1, 2, 3) for t in (1, 2, 3) if (m, t) != (3, 1)]


@pytest.mark.parametrize("mode,threads", MODES, ids=[f"{('auto', 'split', 'rows')[m - 1]}-{t}" for m, t in MODES])
@pytest.mark.parametrize("variant", ["plain", "packed_unsorted", "no_hx"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_step_loop(name, dtype, shape, variant, mode, threads):
    t, b, i, h = SHAPES[shape]
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=dtype, input_size=i, hidden=h, scale=1.0)
    inputs = make_inputs(ours, variant, dtype, t=t, b=b, seed=3)
    (outs, grads), (routs, rgrads), runs = step_loop_and_recurrence(ours, inputs, mode, threads)
    assert runs == 8  # 2 layers x 2 directions, forward and backward
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for k in outs:
        if outs[k].is_floating_point():
            torch.testing.assert_close(routs[k], outs[k], **tol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(routs[k], outs[k])
    for k in grads:
        torch.testing.assert_close(rgrads[k], grads[k], **tol, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("variant", ["plain", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch(name, dtype, variant):
    ours, theirs = make_pair(name, num_layers=2, bidirectional=True, dtype=dtype, input_size=6, hidden=48)
    with num_threads(2), recurrence_mode(2) as mode:
        compare(ours, theirs, make_inputs(ours, variant, dtype, t=5, b=3), f"{name} {variant}")
    assert mode.runs == 8


@pytest.mark.parametrize("case", ["training", "generation"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bench_shapes(name, case):
    """The benchmark's two sequence shapes (fewer steps) against torch in float32."""
    t, b, i, h = (6, 32, 128, 256) if case == "training" else (12, 1, 65, 128)
    ours, theirs = make_pair(name, num_layers=2, dtype=torch.float32, input_size=i, hidden=h, scale=1.0)
    with num_threads(2), recurrence_mode() as mode:
        compare(ours, theirs, make_inputs(ours, "plain", torch.float32, t=t, b=b), case,
                dict(rtol=1e-4, atol=1e-4))
    assert mode.runs == 4


@pytest.mark.parametrize("variant", ["plain", "packed_unsorted"])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_split(name, variant):
    """float64 gradcheck through the split path (3 tasks of 16 units, the last ragged)."""
    ours, _ = make_pair(name, bidirectional=True, input_size=3, hidden=35, scale=1.5)
    inputs = make_inputs(ours, variant, t=3, b=3)
    names = [n for n, _ in ours.named_parameters()]
    leaves = [inputs[k] for k in ("x", "h", "c") if k in inputs]

    def f(x, h, *rest):
        c, params = (rest[0], rest[1:]) if "c" in inputs else (None, rest)
        if "lengths" in inputs:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, inputs["lengths"], enforce_sorted=False)
        out, hn = torch.func.functional_call(ours, dict(zip(names, params)), (x, (h, c) if c is not None else h))
        return ((out.data if "lengths" in inputs else out),) + (hn if isinstance(hn, tuple) else (hn,))

    args = [t.detach().requires_grad_() for t in leaves + [p for _, p in ours.named_parameters()]]
    with num_threads(3), recurrence_mode(2) as mode:
        assert torch.autograd.gradcheck(f, args, fast_mode=True)
    assert mode.runs > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name, threads):
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=16, hidden=64,
                        scale=1.0)
    inputs = make_inputs(ours, "packed_unsorted", torch.float32, t=9, b=3)
    with num_threads(threads), recurrence_mode(2) as mode:
        assert_runs_identical(ours, inputs)
    assert mode.runs == 16


def layer_forward(name, x, h0, c0, w, bi, bh, bs, reverse):
    if name == "lstm":
        return OPS.lstm_layer(x, h0, c0, w, bi, bh, None, bs, reverse, False)[:3]
    if name == "gru":
        return OPS.gru_layer(x, h0, w, bi, bh, bs, reverse, False)[:2]
    return OPS.rnn_layer(x, h0, w, bi, bh, bs, reverse, name == "rnn_relu")


def layer_backward(name, x, h0, c0, w, bi, bh, bs, reverse, grads):
    """The layer's backward op on its forward's saved tensors; grads: the output's, h_n's, c_n's."""
    go, ghn, gcn = grads
    if name == "lstm":
        out, _, _, cs, ws, hp = OPS.lstm_layer(x, h0, c0, w, bi, bh, None, bs, reverse, True)
        return OPS.lstm_layer_backward(go, ghn, gcn, h0, c0, w, None, out, cs, ws, hp, bs, reverse)
    if name == "gru":
        out, _, ws = OPS.gru_layer(x, h0, w, bi, bh, bs, reverse, True)
        return OPS.gru_layer_backward(go, ghn, h0, w, out, ws, bs, reverse)
    out, _ = OPS.rnn_layer(x, h0, w, bi, bh, bs, reverse, name == "rnn_relu")
    return OPS.rnn_layer_backward(go, ghn, h0, w, out, bs, reverse, name == "rnn_relu")


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("name", NAMES)
def test_row_split_matches_unit_split(name, reverse, packed):
    """A layer's forward and backward split over the batch's rows (mode 3 from 2 rows a task)
    against the split over the hidden units (mode 2) and one thread: every element is computed the
    same way whichever rows share its task (the backward's bias gradients summed per row over the
    steps, then over the rows in order, in both splits), so float32 (the panel kernel, where it runs) gives the same bits and
    BLAS's products (float64; float32 on a CPU with neither AVX-512F nor AVX2 + FMA) agree within their dtype's rounding:
    BLAS's order of a product's sums depends on its sizes; a packed batch's tasks lose rows as the
    steps do (and, in reverse, gain them: the rows entering from h0)."""
    g = {"lstm": 4, "gru": 3}.get(name, 1)
    t, b, h = 6, 7, 40
    bs = torch.tensor([7, 7, 5, 4, 4, 2]) if packed else None
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
        n = int(bs.sum()) if packed else t * b
        x = rnd(n, g * h) if packed else rnd(t, b, g * h)
        args = (x, rnd(b, h), rnd(b, h), rnd(g * h, h) * 0.3, rnd(g * h), rnd(g * h), bs, reverse)
        grads = (rnd(n, h) if packed else rnd(t, b, h), rnd(b, h), rnd(b, h))
        bits = dtype == torch.float32 and kernel_serves()  # else BLAS's products: within rounding
        for direction in ("forward", "backward"):
            runs = []
            for mode, threads in ((2, 1), (2, 2), (3, 2), (3, 3), (1, 2)):
                with num_threads(threads), recurrence_mode(mode) as m:
                    runs.append(layer_forward(name, *args) if direction == "forward"
                                else layer_backward(name, *args, grads))
                assert m.runs == (1 if direction == "forward" else 2)
            for other in runs[1:]:
                for got, want in zip(other, runs[0]):
                    if bits:
                        assert torch.equal(got, want), f"{name} {direction}: the split changed the bits"
                    elif dtype == torch.float32:
                        torch.testing.assert_close(got, want, **TOL[torch.float32])
                    else:
                        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_bias_gradient_independent_of_threads(name):
    """The bias gradients are summed per unit, steps and rows in a fixed order: the same bits
    whatever the number of tasks, split over the units or the rows, where the panel kernel computes
    the gate gradients' products (BLAS's, on a CPU with neither AVX-512F nor AVX2 + FMA, round by the split's sizes:
    the sums then agree within float32's rounding)."""
    ours, _ = make_pair(name, dtype=torch.float32, input_size=5, hidden=48, scale=1.0)
    inputs = make_inputs(ours, "plain", torch.float32, t=7, b=6)
    got = []
    for mode, threads in ((2, 1), (2, 2), (2, 3), (3, 2), (3, 3)):
        with num_threads(threads), recurrence_mode(mode):
            _, grads, gouts = run(ours, inputs, None if not got else got[0][2])
        got.append((grads["bias_ih_l0"], grads["bias_hh_l0"], gouts))
    bits = kernel_serves()
    for gi, gh, _ in got[1:]:
        if bits:
            assert torch.equal(gi, got[0][0]) and torch.equal(gh, got[0][1])
        else:
            torch.testing.assert_close((gi, gh), got[0][:2], **TOL[torch.float32])


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu"])
def test_inference_writes_no_workspace(name):
    """Under no_grad (need_backward=False) the same output and states as with a gradient."""
    ours, _ = make_pair(name, num_layers=2, dtype=torch.float32, input_size=10, hidden=40, scale=1.0)
    x = torch.randn(12, 4, 10)
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    with num_threads(2), recurrence_mode(2) as mode:
        with torch.no_grad():
            lean = ours(x)
        full = ours(x)
    assert mode.runs == 4
    for a, b in zip(flat(lean), flat(full)):
        assert torch.equal(a, b.detach())
    if name != "lstm":
        return
    args = (torch.randn(5, 3, 16), torch.randn(3, 4), torch.randn(3, 4), torch.randn(16, 4), None, None, None, None,
            False)
    with recurrence_mode() as mode:
        lean, full = OPS.lstm_layer(*args, False), OPS.lstm_layer(*args, True)
    assert mode.runs == 2
    assert all(t.shape == (0, 0) for t in lean[3:])
    for a, b in zip(lean[:3], full[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["bfloat16", "float16", "proj_size", "switched_off", "gru_half", "gru_off"])
def test_declines(case):
    """Half types and proj_size run the step loop (and stay right); so does everything when off."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "gru_half": torch.bfloat16}.get(case, torch.float64)
    name = {"proj_size": "lstm_proj", "gru_half": "gru", "gru_off": "gru"}.get(case, "lstm")
    ours, theirs = make_pair(name, dtype=dtype, scale=1.0)
    off = case in ("switched_off", "gru_off")
    with recurrence_mode(0 if off else 1) as mode:
        outs, _, _ = run(ours, make_inputs(ours, "plain", dtype))
    assert mode.runs == 0
    if dtype == torch.float64:
        with recurrence_mode(0 if off else 1):
            compare(ours, theirs, make_inputs(ours, "plain", dtype), case)


def test_switch():
    before, _ = OPS._cpu_recurrence(-1)
    assert before in (0, 1, 2, 3)
    with pytest.raises(RuntimeError, match=r"convrnn\._cpu_recurrence: mode"):
        OPS._cpu_recurrence(4)
    assert OPS._cpu_recurrence(-1)[0] == before


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_strided_weights_and_states(name):
    """W_hh, the biases and the initial states as strided views give the bit-identical results of
    their contiguous copies (rnn_layers.cpp makes the layer's tensors contiguous once for both
    recurrences)."""
    g = {"lstm": 4, "gru": 3}.get(name, 1)
    h, b = 20, 3
    x = torch.randn(6, b, g * h)
    w = torch.randn(h, g * h).t() * 0.3  # (G H, H), column-major
    bi, bh = torch.randn(2 * g * h)[::2], torch.randn(2 * g * h)[1::2]
    h0, c0 = torch.randn(h, b).t(), torch.randn(h, b).t()
    assert not (w.is_contiguous() or bi.is_contiguous() or h0.is_contiguous())

    def call(w, bi, bh, h0, c0):
        if name == "lstm":
            return OPS.lstm_layer(x, h0, c0, w, bi, bh, None, None, False, True)
        if name == "gru":
            return OPS.gru_layer(x, h0, w, bi, bh, None, False, True)
        return OPS.rnn_layer(x, h0, w, bi, bh, None, False, False)

    with num_threads(2), recurrence_mode(2) as mode:
        strided = call(w, bi, bh, h0, c0)
        dense = call(*(t.contiguous() for t in (w, bi, bh, h0, c0)))
    assert mode.runs == 2
    for a, d in zip(strided, dense):
        assert torch.equal(a, d)
