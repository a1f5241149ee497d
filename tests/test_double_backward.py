"""Double backward: no op has a derivative of its backward, so differentiating a gradient taken
with create_graph=True must raise an error naming the op (ops/_common.py and
csrc/once_differentiable.h: once_differentiable), not give second-order gradients that are
silently None or zero as torch's fallback for ops without an autograd kernel did.  Every route:
the eager path's C++ nodes (image ops, cells), its Python Functions (sequence layers, input
projection, fused cell steps) and the dispatcher's registered autograd (torch.ops.convrnn.*).
First-order gradients under create_graph stay those of a plain backward."""
import pytest
import torch

from helpers import import_ck

ck = import_ck("conv2d", "lstm_cell")
OPS = torch.ops.convrnn


# one id per entry of _cases, in its order: the route (eager functional, torch.ops, module) and op
CASE_IDS = ["conv2d", "ops.conv2d", "max_pool2d", "ops.max_pool2d", "avg_pool2d", "ops.avg_pool2d",
            "local_response_norm", "ops.local_response_norm", "lstm_cell", "ops.lstm_cell", "gru_cell",
            "rnn_tanh_cell", "ops.rnn_cell", "ops.rnn_cell_fused", "nn.LSTM-h0", "nn.GRU-h0", "nn.RNN-h0",
            "nn.LSTM-input"]


def _cases(device):
    """(op named in the error, call, inputs): each call's first output is differentiated."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x, w, b = r(2, 3, 8, 8), r(4, 3, 3, 3), r(4)
    xi, h, c = r(2, 5), r(2, 4), r(2, 4)
    seq = r(3, 2, 5)
    lstm = ck.nn.LSTM(5, 4).to(device)
    gru = ck.nn.GRU(5, 4, num_layers=2).to(device)
    rnn = ck.nn.RNN(5, 4).to(device)
    cells = {n: (r(k * 4, 5), r(k * 4, 4), r(k * 4), r(k * 4)) for n, k in (("lstm", 4), ("gru", 3), ("rnn", 1))}
    return [
        ("conv2d", lambda x, w, b: ck.conv2d(x, w, b, 1, 1), [x, w, b]),
        ("conv2d", lambda x, w: OPS.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1), [x, w]),
        ("max_pool2d", lambda x: ck.max_pool2d(x, 3, 2, 1), [x]),
        ("max_pool2d", lambda x: OPS.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False, True)[0], [x]),
        ("avg_pool2d", lambda x: ck.avg_pool2d(x, 3, 2, 1), [x]),
        ("avg_pool2d", lambda x: OPS.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True, None), [x]),
        ("local_response_norm", lambda x: ck.local_response_norm(x, 3, 1e-2, 0.75, 2.0), [x]),
        ("local_response_norm", lambda x: OPS.local_response_norm(x, 3, 1e-2, 0.75, 2.0), [x]),
        ("lstm_cell", lambda xi, h, c, *w: ck.lstm_cell(xi, (h, c), *w)[0], [xi, h, c, *cells["lstm"]]),
        ("lstm_cell", lambda xi, h, c, *w: OPS.lstm_cell(xi, h, c, *w)[0], [xi, h, c, *cells["lstm"]]),
        ("gru_cell", lambda xi, h, *w: ck.gru_cell(xi, h, *w), [xi, h, *cells["gru"]]),
        ("rnn_cell", lambda xi, h, *w: ck.rnn_tanh_cell(xi, h, *w), [xi, h, *cells["rnn"]]),
        ("rnn_cell", lambda xi, h, *w: OPS.rnn_cell(xi, h, *w, True), [xi, h, *cells["rnn"]]),
        ("rnn_cell_fused", lambda a, b: OPS.rnn_cell_fused(a, b, None, None, False), [r(2, 4), r(2, 4)]),
        ("lstm_layer", lambda h0: lstm(seq, (h0, h0))[0], [r(1, 2, 4)]),
        ("gru_layer", lambda h0: gru(seq, h0)[0], [r(2, 2, 4)]),
        ("rnn_layer", lambda h0: rnn(seq, h0)[0], [r(1, 2, 4)]),
        # the input's gradient: on the CPU through convrnn::input_projection (float32); on CUDA
        # the projection is F.linear, which has a double backward, so the layer is the first op
        # without one
        ("input_projection" if torch.device(device).type == "cpu" else "lstm_layer", lambda s: lstm(s)[0], [seq]),
    ]


def _case(device, i):
    cases = _cases(device)
    assert len(cases) == len(CASE_IDS)
    return cases[i]


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_double_backward_raises_naming_the_op(device, case):
    name, fn, inputs = _case(device, case)
    leaves = _leaves(inputs)
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True, allow_unused=True)
    penalty = sum((g * g).sum() for g in grads if g is not None)
    assert penalty.requires_grad
    with pytest.raises(RuntimeError, match=f"convrnn::{name}: double backward is not supported"):
        penalty.backward()


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_create_graph_first_order_gradients_unchanged(device, case):
    _, fn, inputs = _case(device, case)
    a, b = _leaves(inputs), _leaves(inputs)
    ga = torch.autograd.grad(fn(*a).sum(), a, create_graph=True, allow_unused=True)
    gb = torch.autograd.grad(fn(*b).sum(), b, allow_unused=True)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x.detach(), y)
            assert not y.requires_grad


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph")
def test_create_graph_leaves_grads_usable(device):
    """.grad filled under create_graph holds the same values, and an optimizer step with it works.
    float64: on CUDA torch's float32 reference would run cuDNN in TF32."""
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    conv = ck.nn.Conv2d(3, 4, 3).to(device, torch.float64)
    conv(x).square().sum().backward(create_graph=True)
    w_grad = conv.weight.grad.detach().clone()
    ref = torch.nn.Conv2d(3, 4, 3).to(device, torch.float64)
    ref.load_state_dict(conv.state_dict())
    ref(x).square().sum().backward()
    torch.testing.assert_close(w_grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.optim.SGD(conv.parameters(), lr=0.1).step()


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_second_order_gradient_of_each_input_raises(device, case):
    """A second-order gradient asked of one input or weight through torch.autograd.grad (a
    gradient penalty's), allow_unused or not, reaches the error node and raises: the error node
    keeps the forward's edges, so such a gradient is never silently None."""
    name, fn, inputs = _case(device, case)
    leaves = _leaves(inputs)
    out = fn(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True, allow_unused=True)
    penalty = sum((g * g).sum() for g in grads if g is not None)
    for leaf in leaves:
        for allow_unused in (False, True):
            with pytest.raises(RuntimeError, match=f"convrnn::{name}: double backward is not supported"):
                torch.autograd.grad(penalty, leaf, retain_graph=True, allow_unused=allow_unused)


def test_second_order_through_incoming_gradient_raises(device):
    """The gradient flowing into the node under create_graph may itself depend on a leaf (here
    through a square after the pool): a second-order gradient of that leaf raises too."""
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    y = ck.max_pool2d(x, 2)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="convrnn::max_pool2d: double backward is not supported"):
        torch.autograd.grad(gx.sum(), x, allow_unused=True)
