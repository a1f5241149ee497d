"""Recurrent cells: lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell.

Each functional is one whole-cell op (convrnn::lstm_cell, gru_cell, rnn_cell): the gate
matrix products (BLAS / cuBLAS) and the fused pointwise step (csrc/rnn_cells.h) in one C++
call, argument checks included, and one autograd node whose backward is one op too
(convrnn::*_cell_backward: the fused backward kernel, the bias sums and the matrix products of
the gradients autograd asks for).  In eager mode that node is C++ (csrc/rnn_cells_autograd.cpp).  Weights and gate order are torch.nn's, so
LSTMCell/GRUCell/RNNCell weights work unchanged.

The fused pointwise ops (convrnn::*_cell_fused) are what the sequence layers call per step
(csrc/rnn_layers.cpp); their fake kernels and autograd formulas are registered here too."""
import torch

from .. import _C
from ._common import OpFunction, _is_compiling, _route, call, once_differentiable

OPS = torch.ops.convrnn
_LSTM, _GRU, _RNN = OPS.lstm_cell.default, OPS.gru_cell.default, OPS.rnn_cell.default


def _both_biases(b_ih, b_hh):
    """torch's cells take either bias alone; the ops take both or neither, so a missing one beside
    a given one becomes zeros (a constant: it gets no gradient).  Both or neither: unchanged."""
    if b_ih is None and isinstance(b_hh, torch.Tensor):
        return torch.zeros_like(b_hh), b_hh
    if b_hh is None and isinstance(b_ih, torch.Tensor):
        return b_ih, torch.zeros_like(b_ih)
    return b_ih, b_hh


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') = LSTM cell step, as torch.lstm_cell / torch.nn.LSTMCell."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"convrnn.lstm_cell: hx must be a pair (h, c) of tensors, but got "
                        f"{type(hx).__name__}{f' of {len(hx)}' if isinstance(hx, (tuple, list)) else ''}")
    h, c = hx
    b_ih, b_hh = _both_biases(b_ih, b_hh)
    hy, cy, _ = call(_LSTM, input, h, c, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def _needs_grad(*tensors):
    """Whether autograd records the call: grad mode on and a tensor requiring grad (the eager
    route says so in one C++ call; where it is the dispatcher's, the same test in Python)."""
    route = 0 if _is_compiling() else _route(tensors)  # dynamo traces the Python test
    if route:
        return route == 2
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = GRU cell step, as torch.gru_cell / torch.nn.GRUCell."""
    b_ih, b_hh = _both_biases(b_ih, b_hh)
    need_backward = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    return call(_GRU, input, hx, w_ih, w_hh, b_ih, b_hh, need_backward)[0]


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.rnn_tanh_cell."""
    b_ih, b_hh = _both_biases(b_ih, b_hh)
    return call(_RNN, input, hx, w_ih, w_hh, b_ih, b_hh, False)


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.rnn_relu_cell."""
    b_ih, b_hh = _both_biases(b_ih, b_hh)
    return call(_RNN, input, hx, w_ih, w_hh, b_ih, b_hh, True)


# ---- whole-cell ops: fake kernels and autograd ----

def _workspace(input, w_hh, rows):
    batch = input.shape[0] if input.dim() == 2 else 1
    return input.new_empty((batch, rows * w_hh.shape[1]))


@torch.library.register_fake("convrnn::lstm_cell")
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape), _workspace(input, w_hh, 4)


@torch.library.register_fake("convrnn::gru_cell")
def _(input, hx, w_ih, w_hh, b_ih, b_hh, need_backward):
    return hx.new_empty(hx.shape), _workspace(input, w_hh, 4) if need_backward else input.new_empty((0,))


@torch.library.register_fake("convrnn::rnn_cell")
def _(input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    return hx.new_empty(hx.shape)


def _fake_grads(mask, *likes):
    """The backward ops' results: a tensor shaped like each argument the mask asks about, an
    empty placeholder for the others."""
    return tuple(like.new_empty(like.shape) if m else like.new_empty((0,)) for m, like in zip(mask, likes))


def _bias_like(w):
    return w.new_empty((w.shape[0],))


@torch.library.register_fake("convrnn::lstm_cell_backward")
def _(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace, output_mask):
    return _fake_grads(output_mask, input, hx, cx, w_ih, w_hh, _bias_like(w_ih), _bias_like(w_ih))


@torch.library.register_fake("convrnn::gru_cell_backward")
def _(grad_hy, input, hx, w_ih, w_hh, workspace, output_mask):
    return _fake_grads(output_mask, input, hx, w_ih, w_hh, _bias_like(w_ih), _bias_like(w_ih))


@torch.library.register_fake("convrnn::rnn_cell_backward")
def _(grad_hy, input, hx, w_ih, w_hh, hy, relu, output_mask):
    return _fake_grads(output_mask, input, hx, w_ih, w_hh, _bias_like(w_ih), _bias_like(w_ih))


def _mask(ctx, n_states):
    """output_mask of a backward op: the differentiable arguments (input, states, weights,
    biases) autograd needs a gradient for.  Without biases their entries are False."""
    need = ctx.needs_input_grad
    k = 3 + n_states  # input, states, w_ih, w_hh
    return [bool(n) for n in need[:k]] + [bool(ctx.has_bias and n) for n in need[k:k + 2]]


def _masked(grads, mask, extra=0):
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * extra


class LstmCellFunction(OpFunction):
    """One autograd node per LSTM step: registered with the dispatcher (OpFunction) for
    tracing; eager calls apply its C++ twin (csrc/rnn_cells_autograd.cpp: a Python node cost as
    much as the step at batch 1).  Saves input, states, weights, c' and the activated gates."""
    op_name = "lstm_cell"
    eager = _C.lstm_cell_autograd

    @staticmethod
    def save(ctx, inputs, output):
        input, hx, cx, w_ih, w_hh, b_ih, _ = inputs
        _, cy, workspace = output
        ctx.save_for_backward(input, hx, cx, w_ih, w_hh, cy, workspace)
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)  # no zero (B, 4H) gradient for the workspace
        ctx.has_bias = b_ih is not None

    @staticmethod
    def backward(ctx, grad_hy, grad_cy, _):
        mask = _mask(ctx, 2)
        if grad_hy is None and grad_cy is None:
            return (None,) * 7
        grads = OPS.lstm_cell_backward.default(grad_hy, grad_cy, *ctx.saved_tensors, mask)
        return _masked(grads, mask)


class GruCellFunction(OpFunction):
    """One autograd node per GRU step (eager: its C++ twin, as LstmCellFunction); saves input,
    hx, weights and the workspace (r, z, n, hn)."""
    op_name = "gru_cell"
    eager = _C.gru_cell_autograd

    @staticmethod
    def save(ctx, inputs, output):
        input, hx, w_ih, w_hh, b_ih, _, _ = inputs
        ctx.save_for_backward(input, hx, w_ih, w_hh, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.has_bias = b_ih is not None

    @staticmethod
    def backward(ctx, grad_hy, _):
        mask = _mask(ctx, 1)
        if grad_hy is None:
            return (None,) * 7
        grads = OPS.gru_cell_backward.default(grad_hy, *ctx.saved_tensors, mask)
        return _masked(grads, mask, extra=1)


class RnnCellFunction(OpFunction):
    """One autograd node per vanilla RNN step (eager: its C++ twin, as LstmCellFunction); saves
    input, hx, weights and h' itself."""
    op_name = "rnn_cell"
    eager = _C.rnn_cell_autograd

    @staticmethod
    def save(ctx, inputs, output):
        input, hx, w_ih, w_hh, b_ih, _, relu = inputs
        ctx.save_for_backward(input, hx, w_ih, w_hh, output)
        ctx.relu = relu
        ctx.has_bias = b_ih is not None

    @staticmethod
    def backward(ctx, grad_hy):
        mask = _mask(ctx, 1)
        input, hx, w_ih, w_hh, hy = ctx.saved_tensors
        grads = OPS.rnn_cell_backward.default(grad_hy, input, hx, w_ih, w_hh, hy, ctx.relu, mask)
        return _masked(grads, mask, extra=1)


# ---- fused pointwise ops (the sequence layers' per-step ops): fake kernels and autograd ----

def _gates_shape(gates_x, k):
    return gates_x.shape[0], gates_x.shape[1] // k


@torch.library.register_fake("convrnn::lstm_cell_fused")
def _(gates_x, gates_h, cx, b_ih, b_hh):
    return torch.empty_like(cx, memory_format=torch.contiguous_format), \
        torch.empty_like(cx, memory_format=torch.contiguous_format), torch.empty_like(gates_x)


@torch.library.register_fake("convrnn::lstm_cell_fused_backward")
def _(grad_hy, grad_cy, cx, cy, workspace):
    return torch.empty_like(workspace), torch.empty_like(cx, memory_format=torch.contiguous_format)


@torch.library.register_fake("convrnn::gru_cell_fused")
def _(gates_x, gates_h, hx, b_ih, b_hh):
    b, h = _gates_shape(gates_x, 3)
    return gates_x.new_empty((b, h)), gates_x.new_empty((b, 4 * h))


@torch.library.register_fake("convrnn::gru_cell_fused_backward")
def _(grad_hy, hx, workspace):
    b, h = workspace.shape[0], workspace.shape[1] // 4
    return workspace.new_empty((b, 3 * h)), workspace.new_empty((b, 3 * h)), workspace.new_empty((b, h))


@torch.library.register_fake("convrnn::rnn_cell_fused")
def _(gates_x, gates_h, b_ih, b_hh, relu):
    return torch.empty_like(gates_x, memory_format=torch.contiguous_format)


@torch.library.register_fake("convrnn::rnn_cell_fused_backward")
def _(grad_hy, hy, relu):
    return torch.empty_like(hy, memory_format=torch.contiguous_format)


# The fused ops' autograd formulas (they are differentiable ops of their own; the sequence
# layers call them with autograd off and have their own backward ops).

def _lstm_fused_setup(ctx, inputs, output):
    _, _, cx, b_ih, b_hh = inputs
    ctx.save_for_backward(cx, output[1], output[2])
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(output[2])


def _lstm_fused_backward(ctx, grad_hy, grad_cy, _):
    cx, cy, workspace = ctx.saved_tensors
    grad_gates, grad_cx = OPS.lstm_cell_fused_backward(grad_hy, grad_cy, cx, cy, workspace)
    gb = grad_gates.sum(0) if any(ctx.has_bias) else None
    return grad_gates, grad_gates, grad_cx, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None


def _gru_fused_setup(ctx, inputs, output):
    _, _, hx, b_ih, b_hh = inputs
    ctx.save_for_backward(hx, output[1])
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(output[1])


def _gru_fused_backward(ctx, grad_hy, _):
    hx, workspace = ctx.saved_tensors
    grad_x, grad_h, grad_hx = OPS.gru_cell_fused_backward(grad_hy, hx, workspace)
    gbi = grad_x.sum(0) if ctx.has_bias[0] else None
    gbh = grad_h.sum(0) if ctx.has_bias[1] else None
    return grad_x, grad_h, grad_hx, gbi, gbh


def _rnn_fused_setup(ctx, inputs, output):
    _, _, b_ih, b_hh, relu = inputs
    ctx.save_for_backward(output)
    ctx.relu = relu
    ctx.has_bias = (b_ih is not None, b_hh is not None)


def _rnn_fused_backward(ctx, grad_hy):
    (hy,) = ctx.saved_tensors
    grad_pre = OPS.rnn_cell_fused_backward(grad_hy, hy, ctx.relu)
    gb = grad_pre.sum(0) if any(ctx.has_bias) else None
    return grad_pre, grad_pre, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None, None


for _name, _setup, _backward in (("lstm_cell_fused", _lstm_fused_setup, _lstm_fused_backward),
                                 ("gru_cell_fused", _gru_fused_setup, _gru_fused_backward),
                                 ("rnn_cell_fused", _rnn_fused_setup, _rnn_fused_backward)):
    torch.library.register_autograd(f"convrnn::{_name}", once_differentiable(_name, _backward), setup_context=_setup)
