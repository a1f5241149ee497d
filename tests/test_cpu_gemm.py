"""Our float products on the CPU (csrc/cpu/panel_gemm.h): our own kernel in place of MKL
wherever the CPU has AVX-512F or AVX2 + FMA (one form each, the same bits), for the sequence layers' recurrence, input projections and weight
gradients and for the cells' gate products; torch.ops.convrnn._cpu_gemm(0) switches back to MKL.

The layers' input projection is an op of its own (convrnn::input_projection, F.linear without a
bias): against F.linear, forward and both gradients, over odd sizes, empty and single rows, no
features and strided inputs; its bad inputs, opcheck and a float64 gradcheck.  The kernel against
MKL on the cells, the layers and the projection; bits independent of the thread count (every output
element is one sum over k in order).  Tests that mean the kernel to run check the switch's run
counter, and skip on a CPU with neither, where the products stay MKL's."""
import pytest
import torch
import torch.nn.functional as F

import convrnn_kernels as ck
from helpers import num_threads, raises_op_arg, switched
from test_rnn_layers import make_inputs, make_pair, run

OPS = torch.ops.convrnn


def kernel_serves():
    """Whether the panel kernel runs here: a float32 layer's recurrence counts its run."""
    with switched(OPS._cpu_gemm, True) as s:
        OPS.rnn_layer(torch.randn(2, 1, 4), torch.zeros(1, 4), torch.randn(4, 4), None, None, None, False, False)
    return s.launches > 0


needs_kernel = pytest.mark.skipif(not kernel_serves(), reason="the CPU has neither AVX-512F nor AVX2 + FMA: the products stay MKL's")


def both(x, w, seed=3):
    """(ours, F.linear's): each (output, grad_input, grad_weight) for one random output gradient."""
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(*x.shape[:-1], w.shape[0], generator=g, dtype=torch.float64).to(x.device, x.dtype)
    res = []
    for fn in (lambda a, b: OPS.input_projection(a, b), F.linear):
        a, b = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = fn(a, b)
        ga, gb = torch.autograd.grad(out, (a, b), gout)
        res.append((out, ga, gb))
    return res


# (rows, I, G): empty, a single row, odd sizes (partial panels and row blocks), the training
# benchmark's layer-2 shape (split over the threads), no input features
SHAPES = [(0, 5, 8), (1, 65, 512), (7, 13, 37), (100, 65, 512), (300, 70, 200), (1600, 256, 1024), (9, 0, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_projection_matches_linear(shape, dtype):
    n, i, g = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, i, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(g, i, generator=gen, dtype=torch.float64) * 0.2).to(dtype)
    (out, gx, gw), (rout, rgx, rgw) = both(x, w)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5 * max(1, n) ** 0.5)
    for name, a, b in (("output", out, rout), ("grad_input", gx, rgx), ("grad_weight", gw, rgw)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_projection_devices(device, dtype):
    """The op on every device (cuBLAS through at::mm on CUDA, MKL for half types on the CPU):
    F.linear's values in every dtype."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, 33, generator=gen).to(device, dtype)
    w = (torch.randn(70, 33, generator=gen) * 0.2).to(device, dtype)
    (out, gx, gw), (rout, rgx, rgw) = both(x, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in ((out, rout), (gx, rgx), (gw, rgw)):
        assert a.device == b.device and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("layout", ["time_major", "batch_first_view", "column_major_weight", "sliced"])
def test_projection_strided(layout):
    """3-D input as the layers pass it, a transposed (batch_first) view, a column-major weight and
    slices of wider tensors: the same values as F.linear."""
    x = torch.randn(6, 5, 24)
    w = torch.randn(40, 24) * 0.2
    if layout == "batch_first_view":
        x = torch.randn(5, 6, 24).transpose(0, 1)
    elif layout == "column_major_weight":
        w = (torch.randn(24, 40) * 0.2).t()
    elif layout == "sliced":
        x = torch.randn(6, 5, 30)[..., 3:27]
        w = torch.randn(40, 33)[:, 5:29] * 0.2
    (out, gx, gw), (rout, rgx, rgw) = both(x, w)
    for a, b in ((out, rout), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_projection_gradient_mask():
    """Only the gradients autograd asks for are computed; the others come back empty."""
    x, w, g = torch.randn(4, 3), torch.randn(5, 3), torch.randn(4, 5)
    gi, gw = OPS.input_projection_backward(g, x, w, [True, False])
    assert gi.shape == x.shape and gw.numel() == 0
    gi, gw = OPS.input_projection_backward(g, x, w, [False, True])
    assert gi.numel() == 0 and gw.shape == w.shape
    torch.testing.assert_close(gw, g.t() @ x)


def test_projection_gradcheck():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: OPS.input_projection(a, b), (x, w))


@pytest.mark.parametrize("grad", [False, True])
def test_projection_opcheck(grad):
    x, w = torch.randn(3, 4, 6, requires_grad=grad), torch.randn(8, 6, requires_grad=grad)
    torch.library.opcheck(OPS.input_projection.default, (x, w))


@pytest.mark.parametrize("case,arg", [("features", "features"), ("weight_1d", "weight"), ("dtype", "dtype"),
                                      ("scalar", "features")])
def test_projection_bad_input(case, arg):
    x, w = torch.randn(4, 6), torch.randn(8, 6)
    if case == "features":
        w = torch.randn(8, 5)
    elif case == "weight_1d":
        w = torch.randn(8)
    elif case == "dtype":
        w = w.double()
    elif case == "scalar":
        x = torch.tensor(1.0)
    with raises_op_arg("input_projection", arg):
        OPS.input_projection(x, w)


def test_switch():
    before, _ = OPS._cpu_gemm(-1)
    assert before in (0, 1)
    with pytest.raises(RuntimeError, match=r"convrnn\._cpu_gemm: mode"):
        OPS._cpu_gemm(2)
    assert OPS._cpu_gemm(-1)[0] == before


# ---- the kernel against MKL, and the thread count ----

def cell_run(cell, b, i, h, seed=0):
    """(outputs and every gradient) of one cell step, float32, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    gates = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1}[cell]
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).requires_grad_()  # noqa: E731
    x, hx = rnd(b, i), rnd(b, h)
    w_ih, w_hh = rnd(gates * h, i, scale=i ** -0.5), rnd(gates * h, h, scale=h ** -0.5)
    b_ih, b_hh = rnd(gates * h), rnd(gates * h)
    leaves = [x, hx, w_ih, w_hh, b_ih, b_hh]
    if cell == "lstm_cell":
        c = rnd(b, h)
        outs = ck.lstm_cell(x, (hx, c), w_ih, w_hh, b_ih, b_hh)
        leaves.append(c)
    else:
        outs = (getattr(ck, cell)(x, hx, w_ih, w_hh, b_ih, b_hh),)
    gouts = [torch.randn(o.shape, generator=g) for o in outs]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, gouts))


CELL_SHAPES = [(64, 256, 512), (7, 13, 37), (40, 70, 100)]


@needs_kernel
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", ["lstm_cell", "gru_cell", "rnn_tanh_cell"])
def test_cells_kernel_matches_mkl_and_threads(cell, shape):
    """The cells' gate products (B > 1) through the kernel agree with MKL's, and give the same
    bits on 1, 2 and 3 threads (the products split over them by columns or whole)."""
    with switched(OPS._cpu_gemm, False):
        mkl = cell_run(cell, *shape)
    runs = []
    for n in (1, 2, 3):
        with num_threads(n), switched(OPS._cpu_gemm, True):
            runs.append(cell_run(cell, *shape))
    for a, b in zip(runs[0], mkl):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), f"{cell}: the thread count changed the bits"


@needs_kernel
@pytest.mark.parametrize("variant", ["plain", "packed_unsorted"])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_layers_kernel_matches_mkl_and_threads(name, variant):
    """Two bidirectional layers whose projections and weight gradients split over the threads
    (T*B = 320 rows): the kernel agrees with MKL and gives the same bits on 1, 2 and 3 threads."""
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=64, hidden=64,
                        scale=1.0)
    inputs = make_inputs(ours, variant, torch.float32, t=10, b=32, seed=2)
    with switched(OPS._cpu_gemm, False):
        mkl_outs, mkl_grads, gouts = run(ours, inputs)
    runs = []
    for n in (1, 2, 3):
        with num_threads(n), switched(OPS._cpu_gemm, True) as s:
            runs.append(run(ours, inputs, gouts)[:2])
        assert s.launches == 8  # 2 layers x 2 directions, forward and backward
    outs, grads = runs[0]
    for k in outs:
        if outs[k].is_floating_point():
            torch.testing.assert_close(outs[k], mkl_outs[k], rtol=2e-5, atol=2e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], mkl_grads[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {k}: {m}")
    for o, g in runs[1:]:
        assert all(torch.equal(o[k], outs[k]) for k in outs)
        assert all(torch.equal(g[k], grads[k]) for k in grads), "the thread count changed the bits"


def in_order_sums(x, w):
    """x @ w.T in float32 as one fused multiply-add a k, in order of k from zero: the product is
    exact in float64 and the sum rounds there, then to float32; that double rounding differs from
    an FMA's single one only where the float64 sum falls exactly halfway between two floats
    (about 2^-29 a step)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    for k in range(x.shape[1]):
        acc = (acc.double() + x[:, k, None].double() * w[None, :, k].double()).float()
    return acc


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 100), (1, 512), (2, 200), (3, 37), (5, 130), (7, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_step_product_sums_in_order(shape):
    """A recurrence step's product (the state times W_hh^T, packed panels) is one sum over k in
    order for every element, bit for bit, whatever the row count: below 3 rows block_avx2 runs
    several 16-column strips at once (its S), partial panels and strips included.  A ReLU layer
    of one step from a zero input projection and no bias returns relu(h0 W_hh^T) itself."""
    b, h = shape
    gen = torch.Generator().manual_seed(5)
    h0 = torch.randn(b, h, generator=gen)
    w_hh = torch.randn(h, h, generator=gen) * h ** -0.5
    for n in (1, 2):
        with num_threads(n), switched(OPS._cpu_gemm, True) as s:
            out, _ = OPS.rnn_layer(torch.zeros(1, b, h), h0, w_hh, None, None, None, False, True)
        assert s.launches == 1
        assert torch.equal(out[0], in_order_sums(h0, w_hh).clamp_min(0)), f"{n} threads"


@needs_kernel
@pytest.mark.parametrize("shape", [(50, 70, 300), (64, 300, 260), (130, 300, 40), (97, 33, 520), (60, 17, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_products_sum_in_order(shape):
    """Every form of the product sums over k in order, bit for bit: the projection's forward (B
    transposed: C^T from the weight's rows against packed panels, or the input's rows against the
    weight packed), its grad_input (B = the weight's own rows, which the AVX2 form packs into
    strips a K-block at a time, all panels at once or panel by panel) and its grad_weight (A
    transposed, copied in groups of rows); widths that end inside a strip, depths across K-blocks
    (256)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    g = torch.randn(m, n, generator=gen)
    with num_threads(1), switched(OPS._cpu_gemm, True):
        out = OPS.input_projection(x, w)
        gx, gw = OPS.input_projection_backward(g, x, w, [True, True])
    assert torch.equal(out, in_order_sums(x, w)), "forward"
    assert torch.equal(gx, in_order_sums(g, w.t())), "grad_input"
    assert torch.equal(gw, in_order_sums(g.t(), x.t())), "grad_weight"


@needs_kernel
def test_projection_threads():
    x, w = torch.randn(300, 70), torch.randn(200, 70)
    runs = []
    for n in (1, 2, 3):
        with num_threads(n):
            runs.append(both(x, w)[0])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_projection_short_row_blocks():
    """A tall product split over so many threads that each gets fewer rows than the transposed
    kernel takes: those blocks go to BLAS, and the values stay F.linear's."""
    x, w = torch.randn(100, 1000), torch.randn(20, 1000) * 0.05
    with num_threads(16):
        (out, gx, gw), (rout, rgx, rgw) = both(x, w)
    for a, b in ((out, rout), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
