"""Fused recurrent cells: lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell.

The gate matrix products are torch's (F.linear without bias, so autograd differentiates
them); everything after them is one fused op per step, forward and backward
(csrc/rnn_cells.h), whose autograd formula is registered with the dispatcher.  Weights and
gate order are torch.nn's, so LSTMCell/GRUCell/RNNCell weights work unchanged."""
import torch
import torch.nn.functional as F

OPS = torch.ops.convrnn


def _check(op, input, states, w_ih, w_hh, b_ih, b_hh, gates):
    """Validates the arguments of a cell as torch.nn.*Cell would, with messages naming the op
    and the argument; returns whether the input is batched."""
    def fail(msg):
        raise RuntimeError(f"convrnn.{op}: {msg}")

    for name, t in [("input", input), ("w_ih", w_ih), ("w_hh", w_hh)] + list(states.items()) + \
            [(n, b) for n, b in (("b_ih", b_ih), ("b_hh", b_hh)) if b is not None]:
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, but got {type(t).__name__}")
        if t.dtype != input.dtype and not torch._C._is_any_autocast_enabled():  # as torch.nn.RNNBase
            raise TypeError(f"convrnn.{op}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "expected one dtype")
        if t.device != input.device:
            fail(f"{name} is on {t.device} but input is on {input.device}; expected all tensors on one device")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"convrnn.{op}: input must be float32, float64, float16 or bfloat16, but got {input.dtype}")
    if input.dim() not in (1, 2):
        fail(f"input must be 1-D (input_size) or 2-D (batch, input_size), but got shape {tuple(input.shape)}")
    if w_hh.dim() != 2 or w_ih.dim() != 2:
        fail(f"w_ih and w_hh must be 2-D, but got shapes {tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if w_hh.shape[0] != gates * hidden:
        fail(f"w_hh must have {gates} * hidden_size = {gates * hidden} rows, but got shape {tuple(w_hh.shape)}")
    if w_ih.shape[0] != gates * hidden:
        fail(f"w_ih must have {gates} * hidden_size = {gates * hidden} rows, but got shape {tuple(w_ih.shape)}")
    if input.shape[-1] != w_ih.shape[1]:
        fail(f"input has {input.shape[-1]} features but w_ih expects input_size = {w_ih.shape[1]}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * hidden,):
            fail(f"{name} must have shape ({gates * hidden},), but got {tuple(b.shape)}")
    expected = (input.shape[0], hidden) if input.dim() == 2 else (hidden,)
    for name, t in states.items():
        if tuple(t.shape) != expected:
            fail(f"{name} must have shape {expected} (batch and hidden_size of the input and weights), "
                 f"but got {tuple(t.shape)}")
    if (b_ih is None) != (b_hh is None):
        fail("b_ih and b_hh must be given together")
    return input.dim() == 2


def _batched(t, batched):
    return t if batched else t.unsqueeze(0)


def _unbatched(t, batched):
    return t if batched else t.squeeze(0)


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') = LSTM cell step, as torch.lstm_cell / torch.nn.LSTMCell."""
    h, c = hx
    batched = _check("lstm_cell", input, {"h": h, "c": c}, w_ih, w_hh, b_ih, b_hh, 4)
    x, h, c = (_batched(t, batched) for t in (input, h, c))
    hy, cy, _ = OPS.lstm_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), c, b_ih, b_hh)
    return _unbatched(hy, batched), _unbatched(cy, batched)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = GRU cell step, as torch.gru_cell / torch.nn.GRUCell."""
    batched = _check("gru_cell", input, {"hx": hx}, w_ih, w_hh, b_ih, b_hh, 3)
    x, h = _batched(input, batched), _batched(hx, batched)
    hy, _ = OPS.gru_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), h, b_ih, b_hh)
    return _unbatched(hy, batched)


def _rnn_cell(op, relu, input, hx, w_ih, w_hh, b_ih, b_hh):
    batched = _check(op, input, {"hx": hx}, w_ih, w_hh, b_ih, b_hh, 1)
    x, h = _batched(input, batched), _batched(hx, batched)
    return _unbatched(OPS.rnn_cell_fused(F.linear(x, w_ih), F.linear(h, w_hh), b_ih, b_hh, relu), batched)


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.rnn_tanh_cell."""
    return _rnn_cell("rnn_tanh_cell", False, input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh), as torch.rnn_relu_cell."""
    return _rnn_cell("rnn_relu_cell", True, input, hx, w_ih, w_hh, b_ih, b_hh)


# ---- fake kernels ----

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


# ---- autograd: the fused ops' formulas, registered with the dispatcher ----

class LstmCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(gates_x, gates_h, cx, b_ih, b_hh):
        return OPS.lstm_cell_fused(gates_x, gates_h, cx, b_ih, b_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, cx, b_ih, b_hh = inputs
        _, cy, workspace = output
        ctx.save_for_backward(cx, cy, workspace)
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.mark_non_differentiable(workspace)

    @staticmethod
    def backward(ctx, grad_hy, grad_cy, _):
        cx, cy, workspace = ctx.saved_tensors
        grad_gates, grad_cx = OPS.lstm_cell_fused_backward(grad_hy, grad_cy, cx, cy, workspace)
        gb = grad_gates.sum(0) if any(ctx.has_bias) else None
        return (grad_gates, grad_gates, grad_cx, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None)


class GruCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(gates_x, gates_h, hx, b_ih, b_hh):
        return OPS.gru_cell_fused(gates_x, gates_h, hx, b_ih, b_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, hx, b_ih, b_hh = inputs
        ctx.save_for_backward(hx, output[1])
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_hy, _):
        hx, workspace = ctx.saved_tensors
        grad_x, grad_h, grad_hx = OPS.gru_cell_fused_backward(grad_hy, hx, workspace)
        gbi = grad_x.sum(0) if ctx.has_bias[0] else None
        gbh = grad_h.sum(0) if ctx.has_bias[1] else None
        return grad_x, grad_h, grad_hx, gbi, gbh


class RnnCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(gates_x, gates_h, b_ih, b_hh, relu):
        return OPS.rnn_cell_fused(gates_x, gates_h, b_ih, b_hh, relu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, b_ih, b_hh, relu = inputs
        ctx.save_for_backward(output)
        ctx.relu = relu
        ctx.has_bias = (b_ih is not None, b_hh is not None)

    @staticmethod
    def backward(ctx, grad_hy):
        (hy,) = ctx.saved_tensors
        grad_pre = OPS.rnn_cell_fused_backward(grad_hy, hy, ctx.relu)
        gb = grad_pre.sum(0) if any(ctx.has_bias) else None
        return grad_pre, grad_pre, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None, None


for _name, _fn in (("lstm_cell_fused", LstmCellFunction), ("gru_cell_fused", GruCellFunction),
                   ("rnn_cell_fused", RnnCellFunction)):
    torch.library.register_autograd(f"convrnn::{_name}", _fn.backward, setup_context=_fn.setup_context)
