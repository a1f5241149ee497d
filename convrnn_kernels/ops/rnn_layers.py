"""Whole-sequence recurrent layers: lstm, gru, rnn_tanh, rnn_relu (multi-layer, bidirectional,
projections, PackedSequence data), the functional behind convrnn_kernels.nn.LSTM/GRU/RNN.

Per layer and direction the input projection of every step is ONE matrix product over the
whole (T*B, I) input (convrnn::input_projection for float32 on the CPU, F.linear elsewhere),
differentiated by autograd; the recurrence is one dispatcher op (convrnn::lstm_layer, gru_layer, rnn_layer: csrc/rnn_layers.cpp) whose C++ loop calls an
at::mm and a fused cell op per step; its backward is another op (*_layer_backward) registered
as the autograd formula here.  Weights and gate order are torch.nn's."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._common import OpFunction, _autocast_enabled, call

OPS = torch.ops.convrnn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
OP_NAMES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- fake kernels ----

def _rows(x_proj):
    n = 1
    for s in x_proj.shape[:-1]:
        n *= s
    return n


@torch.library.register_fake("convrnn::lstm_layer")
def _(x_proj, h0, c0, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward=True):
    hidden, p = w_hh.shape[0] // 4, w_hh.shape[1]
    n = _rows(x_proj) if need_backward else 0
    saved = (lambda cols: x_proj.new_empty((n, cols) if need_backward else (0, 0)))
    return (x_proj.new_empty((*x_proj.shape[:-1], p)), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            saved(hidden), saved(4 * hidden), x_proj.new_empty((n, hidden) if w_hr is not None and need_backward
                                                              else (0, 0)))


@torch.library.register_fake("convrnn::lstm_layer_backward")
def _(grad_output, grad_hn, grad_cn, h0, c0, w_hh, w_hr, output, cs, workspace, hp, batch_sizes, reverse):
    g = w_hh.shape[0]
    return (output.new_empty((*output.shape[:-1], g)), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            w_hh.new_empty(w_hh.shape), w_hh.new_empty((g,)),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty((0,)))


@torch.library.register_fake("convrnn::gru_layer")
def _(x_proj, h0, w_hh, b_ih, b_hh, batch_sizes, reverse, need_backward=True):
    hidden = w_hh.shape[1]
    return (x_proj.new_empty((*x_proj.shape[:-1], hidden)), h0.new_empty(h0.shape),
            x_proj.new_empty((_rows(x_proj), 4 * hidden) if need_backward else (0, 0)))


@torch.library.register_fake("convrnn::gru_layer_backward")
def _(grad_output, grad_hn, h0, w_hh, output, workspace, batch_sizes, reverse):
    g = w_hh.shape[0]
    return (output.new_empty((*output.shape[:-1], g)), h0.new_empty(h0.shape), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty((g,)), w_hh.new_empty((g,)))


@torch.library.register_fake("convrnn::rnn_layer")
def _(x_proj, h0, w_hh, b_ih, b_hh, batch_sizes, reverse, relu):
    return x_proj.new_empty((*x_proj.shape[:-1], w_hh.shape[1])), h0.new_empty(h0.shape)


@torch.library.register_fake("convrnn::rnn_layer_backward")
def _(grad_output, grad_hn, h0, w_hh, output, batch_sizes, reverse, relu):
    g = w_hh.shape[0]
    return (output.new_empty((*output.shape[:-1], g)), h0.new_empty(h0.shape), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty((g,)))


@torch.library.register_fake("convrnn::input_projection")
def _(input, weight):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("convrnn::input_projection_backward")
def _(grad, input, weight, output_mask):
    return (input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)))


@torch.library.register_fake("convrnn::rnn_stack")
def _(x_proj, hx, cx, w_ih, w_hh, b_ih, b_hh, cell):
    return (x_proj.new_empty((*x_proj.shape[:-1], w_hh[0].shape[1])), hx.new_empty(hx.shape),
            cx.new_empty(cx.shape) if cell == 0 else x_proj.new_empty((0,)))


def _stack_setup(ctx, inputs, output):
    raise RuntimeError("convrnn.rnn_stack: an inference op with no backward, but a gradient is required; "
                       "the modules run the layer ops (lstm_layer, gru_layer, rnn_layer) wherever one is")


def _stack_backward(ctx, *grads):  # never reached: _stack_setup refuses first
    raise RuntimeError("convrnn.rnn_stack has no backward")


torch.library.register_autograd("convrnn::rnn_stack", _stack_backward, setup_context=_stack_setup)


# ---- autograd: the backward ops, registered with the dispatcher ----

def _need_backward(inputs, index, op):
    if len(inputs) > index and not inputs[index]:
        raise RuntimeError(f"convrnn.{op}: need_backward=False saves nothing for the backward, but a gradient is "
                           "required; pass need_backward=True")


def _lstm_setup(ctx, inputs, output):
    x_proj, h0, c0, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs[:9]
    _need_backward(inputs, 9, "lstm_layer")
    out, _, _, cs, ws, hp = output
    ctx.save_for_backward(h0, c0, w_hh, w_hr, out, cs, ws, hp, batch_sizes)
    ctx.reverse = reverse
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.has_proj = w_hr is not None
    ctx.mark_non_differentiable(cs, ws, hp)
    ctx.set_materialize_grads(False)  # unused outputs pass None (no zero-filled (N, 4H) gradients)


def _lstm_backward(ctx, grad_out, grad_hn, grad_cn, _cs, _ws, _hp):
    h0, c0, w_hh, w_hr, out, cs, ws, hp, batch_sizes = ctx.saved_tensors
    gx, gh0, gc0, gw, gb, gwr = OPS.lstm_layer_backward(grad_out, grad_hn, grad_cn, h0, c0, w_hh, w_hr, out, cs, ws,
                                                        hp, batch_sizes, ctx.reverse)
    return (gx, gh0, gc0, gw, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None,
            gwr if ctx.has_proj else None, None, None, None)


def _gru_setup(ctx, inputs, output):
    x_proj, h0, w_hh, b_ih, b_hh, batch_sizes, reverse = inputs[:7]
    _need_backward(inputs, 7, "gru_layer")
    out, _, ws = output
    ctx.save_for_backward(h0, w_hh, out, ws, batch_sizes)
    ctx.reverse = reverse
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)


def _gru_backward(ctx, grad_out, grad_hn, _ws):
    h0, w_hh, out, ws, batch_sizes = ctx.saved_tensors
    gx, gh0, gw, gbi, gbh = OPS.gru_layer_backward(grad_out, grad_hn, h0, w_hh, out, ws, batch_sizes, ctx.reverse)
    return (gx, gh0, gw, gbi if ctx.has_bias[0] else None, gbh if ctx.has_bias[1] else None, None, None, None)


def _rnn_setup(ctx, inputs, output):
    x_proj, h0, w_hh, b_ih, b_hh, batch_sizes, reverse, relu = inputs
    ctx.save_for_backward(h0, w_hh, output[0], batch_sizes)
    ctx.reverse, ctx.relu = reverse, relu
    ctx.set_materialize_grads(False)
    ctx.has_bias = (b_ih is not None, b_hh is not None)


def _rnn_backward(ctx, grad_out, grad_hn):
    h0, w_hh, out, batch_sizes = ctx.saved_tensors
    gx, gh0, gw, gb = OPS.rnn_layer_backward(grad_out, grad_hn, h0, w_hh, out, batch_sizes, ctx.reverse, ctx.relu)
    return (gx, gh0, gw, gb if ctx.has_bias[0] else None, gb if ctx.has_bias[1] else None, None, None, None)


def _projection_setup(ctx, inputs, output):
    input, weight = inputs
    ctx.save_for_backward(input, weight)


def _projection_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    gi, gw = OPS.input_projection_backward(grad, input, weight, [need[0], need[1]])
    return (gi if need[0] else None), (gw if need[1] else None)


class InputProjectionFunction(OpFunction):
    op_name = "input_projection"
    save, backward = staticmethod(_projection_setup), staticmethod(_projection_backward)


def project(input, weight):
    """Every step's input projection, input (..., I) times weight^T: convrnn::input_projection (our
    float products on the CPU, cpu/panel_gemm.h) for float32 CPU tensors outside autocast, else
    F.linear (cuBLAS on the GPU; autocast's casts)."""
    if (input.dtype == torch.float32 and weight.dtype == torch.float32 and input.device.type == "cpu"
            and weight.device.type == "cpu" and not _autocast_enabled()):
        return call(OPS.input_projection.default, input, weight)
    return F.linear(input, weight)


class LstmLayerFunction(OpFunction):
    op_name = "lstm_layer"
    save, backward = staticmethod(_lstm_setup), staticmethod(_lstm_backward)


class GruLayerFunction(OpFunction):
    op_name = "gru_layer"
    save, backward = staticmethod(_gru_setup), staticmethod(_gru_backward)


class RnnLayerFunction(OpFunction):
    op_name = "rnn_layer"
    save, backward = staticmethod(_rnn_setup), staticmethod(_rnn_backward)


# ---- argument checks (messages name the op and the argument) ----

def _fail(op, msg, exc=RuntimeError):
    raise exc(f"convrnn.{op}: {msg}")


def check_sequence_args(mode, input, hx, cx, weights, names, *, input_size, hidden_size, num_layers,
                        bidirectional, proj_size, batch):
    """Validates a (time-major or packed) input, the states (L*D, B, P) / (L*D, B, H) and every
    layer's weights against the module's sizes; `names` are the weights' parameter names."""
    op = OP_NAMES[mode]
    if not isinstance(num_layers, int) or num_layers < 1:
        _fail(op, f"num_layers must be an integer >= 1, but got {num_layers!r}", ValueError)
    if not isinstance(input, torch.Tensor):
        _fail(op, f"input must be a tensor or a PackedSequence, but got {type(input).__name__}", TypeError)
    if input.dtype not in FLOATING:
        _fail(op, f"input must be float32, float64, float16 or bfloat16, but got {input.dtype}", TypeError)
    if input.shape[-1] != input_size:
        _fail(op, f"input has {input.shape[-1]} features (input.size(-1)) but the layer expects "
                  f"input_size = {input_size}")
    g, d = GATES[mode], 2 if bidirectional else 1
    real_hidden = proj_size if proj_size > 0 else hidden_size
    if proj_size < 0 or proj_size >= hidden_size:
        _fail(op, f"proj_size must be in [0, hidden_size = {hidden_size}), but got {proj_size}", ValueError)
    for name, t, shape in (("hx", hx, (num_layers * d, batch, real_hidden)),
                           ("cx", cx, (num_layers * d, batch, hidden_size))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, but got {type(t).__name__}", TypeError)
        _same(op, name, t, input)
        if tuple(t.shape) != shape:
            _fail(op, f"{name} must have shape {shape} (num_layers * num_directions, batch, "
                      f"{'proj_size' if name == 'hx' and proj_size else 'hidden_size'}), but got {tuple(t.shape)}")
    for idx, (ws, ns) in enumerate(zip(weights, names)):
        layer = idx // d
        in_features = input_size if layer == 0 else real_hidden * d
        expected = {"w_ih": (g * hidden_size, in_features), "w_hh": (g * hidden_size, real_hidden),
                    "b_ih": (g * hidden_size,), "b_hh": (g * hidden_size,), "w_hr": (proj_size, hidden_size)}
        for key, w, name in zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), ws, ns):
            if w is None:
                continue
            if not isinstance(w, torch.Tensor):
                _fail(op, f"{name} must be a tensor, but got {type(w).__name__}", TypeError)
            _same(op, name, w, input)
            if tuple(w.shape) != expected[key]:
                _fail(op, f"{name} must have shape {expected[key]}, but got {tuple(w.shape)}")


def _same(op, name, t, input):
    if t.dtype != input.dtype and not torch._C._is_any_autocast_enabled():  # as torch.nn.RNNBase
        _fail(op, f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; expected one dtype", TypeError)
    if t.device != input.device:
        _fail(op, f"{name} is on {t.device} but input is on {input.device}; expected all tensors on one device")


# ---- the functional ----

CELLS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}  # convrnn::rnn_stack's cell


def _stack_serves(mode, input, hx, cx, weights, batch_sizes, num_layers, d, dropout, training):
    """Whether run_layers hands the whole stack to convrnn::rnn_stack: CUDA inference (no
    gradient needed, no dropout applied) of two or more unidirectional layers without
    projections on unpacked input, outside autocast (whose casts the layer ops' rules make).
    On CUDA the op runs every layer in one persistent kernel where it can (rnn_persistent.h)."""
    if not input.is_cuda or d != 1 or num_layers < 2 or batch_sizes is not None or (dropout > 0 and training):
        return False
    if torch._C._is_any_autocast_enabled() or any(w[4] is not None for w in weights):
        return False
    if torch.is_grad_enabled():
        tensors = [input, hx, cx] + [t for w in weights for t in w]
        if any(t is not None and t.requires_grad for t in tensors):
            return False
    return True


Weights = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def run_layers(mode: str, input: torch.Tensor, hx: torch.Tensor, cx: Optional[torch.Tensor],
               weights: Sequence[Weights], *, batch_sizes: Optional[torch.Tensor], num_layers: int,
               bidirectional: bool, dropout: float, training: bool):
    """All layers of a stacked RNN.  input: time-major (T, B, I), or the (N, I) data of a
    PackedSequence with its batch_sizes; hx (L*D, B, P), cx (L*D, B, H) for LSTM;
    weights[layer * D + direction] = (w_ih, w_hh, b_ih, b_hh, w_hr).  Returns (output, h_n,
    c_n or None), output shaped like input with D * P features."""
    d = 2 if bidirectional else 1
    grad = torch.is_grad_enabled()
    if _stack_serves(mode, input, hx, cx, weights, batch_sizes, num_layers, d, dropout, training):
        out, h_n, c_n = call(OPS.rnn_stack.default, F.linear(input, weights[0][0]), hx, cx if mode == "LSTM" else None,
                             [w[0] for w in weights[1:]], [w[1] for w in weights], [w[2] for w in weights],
                             [w[3] for w in weights], CELLS[mode])
        return out, h_n, (c_n if mode == "LSTM" else None)
    layer_input = input
    hs: List[torch.Tensor] = []
    cs: List[torch.Tensor] = []
    for layer in range(num_layers):
        outs = []
        for direction in range(d):
            idx = layer * d + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[idx]
            x_proj = project(layer_input, w_ih)  # every step's input projection: one matrix product
            reverse = direction == 1
            need = grad and any(t is not None and t.requires_grad for t in (x_proj, hx, cx, w_hh, b_ih, b_hh, w_hr))
            if mode == "LSTM":
                out, h_n, c_n, _, _, _ = call(OPS.lstm_layer.default, x_proj, hx[idx], cx[idx],
                                              w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need)
                cs.append(c_n)
            elif mode == "GRU":
                out, h_n, _ = call(OPS.gru_layer.default, x_proj, hx[idx], w_hh, b_ih, b_hh,
                                   batch_sizes, reverse, need)
            else:
                out, h_n = call(OPS.rnn_layer.default, x_proj, hx[idx], w_hh, b_ih, b_hh,
                                batch_sizes, reverse, mode == "RNN_RELU")
            outs.append(out)
            hs.append(h_n)
        layer_input = outs[0] if d == 1 else torch.cat(outs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(hs), (torch.stack(cs) if mode == "LSTM" else None)
