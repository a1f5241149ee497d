"""Pure-PyTorch references for the recurrent cells (LSTM, GRU, Elman RNN), written from the
equations.

They never call torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell,
torch.nn.*Cell or torch._VF: the gate pre-activations are two matmuls and the cell update is
spelled out below, so a bug shared by torch and a kernel does not hide.  The tests and the
benchmark's correctness pass compare against them.

Equations (H = hidden size; the gate blocks of w_ih / w_hh / b_ih / b_hh are stacked in
torch's order):

  LSTM  gates = x W_ih^T + b_ih + h W_hh^T + b_hh, split into i, f, g, o (4H rows)
        i, f, o = sigmoid(.), g = tanh(.);  c' = f * c + i * g;  h' = o * tanh(c')
  GRU   gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh, each split into r, z, n (3H rows)
        r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n)
        h' = (1 - z) * n + z * h
  RNN   h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh or relu (H rows)

  LSTM with projection (proj_size P): h' = (o * tanh(c')) W_hr^T, and W_hh is (4H, P).

Shapes follow torch.nn.*Cell: input (B, I) or unbatched (I,), h and c (B, H) or (H,);
an unbatched input gives unbatched results.  Biases may be None (no bias).

Precision: every tensor is upcast to float64, the cell is computed there, and the results are
rounded once to the input dtype, so half-precision results are as accurate as any kernel can
be.  All functions are differentiable through autograd (gradients come back in each
argument's own dtype).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "rnn_sequence"]


def _check(op: str, gates: int, input: Tensor, hs: Tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
           b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> None:
    """Shape checks with messages naming the op and the argument (the references are also used
    on their own, so a silent broadcast would be a wrong answer)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"reference.{op}: input must be 1-D or 2-D, but got {input.dim()}-D")
    hidden = w_hh.shape[-1] if w_hh.dim() == 2 else -1
    if w_hh.dim() != 2 or w_hh.shape[0] != gates * hidden:
        raise ValueError(f"reference.{op}: w_hh must be ({gates}*H, H), but got {tuple(w_hh.shape)}")
    if w_ih.dim() != 2 or w_ih.shape != (gates * hidden, input.shape[-1]):
        raise ValueError(f"reference.{op}: w_ih must be ({gates * hidden}, {input.shape[-1]}), "
                         f"but got {tuple(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * hidden,):
            raise ValueError(f"reference.{op}: {name} must be ({gates * hidden},), but got {tuple(b.shape)}")
    expected = input.shape[:-1] + (hidden,)
    for name, h in zip(("hx", "cx"), hs):
        if tuple(h.shape) != tuple(expected):
            raise ValueError(f"reference.{op}: {name} must be {tuple(expected)}, but got {tuple(h.shape)}")


def _f64(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float64)


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x W^T + b for a 2-D x, in float64."""
    y = x @ w.t()
    return y if b is None else y + b


def _batched(input: Tensor, *hs: Tensor) -> Tuple[bool, Tensor, Tuple[Tensor, ...]]:
    """(was unbatched, input as (B, I) float64, states as (B, H) float64)."""
    unbatched = input.dim() == 1
    fix = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)
    return unbatched, fix(_f64(input)), tuple(fix(_f64(h)) for h in hs)


def _out(t: Tensor, unbatched: bool, dtype: torch.dtype) -> Tensor:
    return (t.squeeze(0) if unbatched else t).to(dtype)


def lstm_cell(input: Tensor, hx: Tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step: (h', c') from input and hx = (h, c)."""
    h, c = hx
    _check("lstm_cell", 4, input, (h, c), w_ih, w_hh, b_ih, b_hh)
    unbatched, x, (h64, c64) = _batched(input, h, c)
    gates = _linear(x, _f64(w_ih), _f64(b_ih)) + _linear(h64, _f64(w_hh), _f64(b_hh))
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c64 + i * g
    h_new = o * torch.tanh(c_new)
    return _out(h_new, unbatched, input.dtype), _out(c_new, unbatched, input.dtype)


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step: h' from input and h (the reset gate multiplies gh_n including b_hn)."""
    _check("gru_cell", 3, input, (hx,), w_ih, w_hh, b_ih, b_hh)
    unbatched, x, (h,) = _batched(input, hx)
    gi = _linear(x, _f64(w_ih), _f64(b_ih))
    gh = _linear(h, _f64(w_hh), _f64(b_hh))
    gi_r, gi_z, gi_n = gi.chunk(3, dim=1)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    h_new = (1 - z) * n + z * h
    return _out(h_new, unbatched, input.dtype)


def _rnn_cell(op: str, act, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    _check(op, 1, input, (hx,), w_ih, w_hh, b_ih, b_hh)
    unbatched, x, (h,) = _batched(input, hx)
    pre = _linear(x, _f64(w_ih), _f64(b_ih)) + _linear(h, _f64(w_hh), _f64(b_hh))
    return _out(act(pre), unbatched, input.dtype)


def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """One Elman RNN step with tanh: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn_cell("rnn_tanh_cell", torch.tanh, input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """One Elman RNN step with relu: h' = max(0, x W_ih^T + b_ih + h W_hh^T + b_hh); the
    gradient at exactly 0 is 0, as torch.relu's."""
    return _rnn_cell("rnn_relu_cell", torch.relu, input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_sequence(mode: str, input: Tensor, hx, weights, num_layers: int = 1, bidirectional: bool = False,
                 lengths=None):
    """A stacked (optionally bidirectional) RNN over a time-major sequence, as torch.nn.LSTM,
    GRU and RNN compute it (without dropout): a plain Python loop over the steps of the cell
    equations above.

    mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"; input (T, B, I); hx: h0 (L*D, B, P), or
    (h0, c0) for LSTM with c0 (L*D, B, H); weights[layer * D + direction] = (w_ih, w_hh, b_ih,
    b_hh, w_hr), None where absent (w_hr: the LSTM projection, proj_size rows).  The input of
    layer l > 0 is the previous layer's outputs of both directions, concatenated.
    lengths: per-sequence lengths of a padded batch: a sequence's steps beyond its length leave
    its state as it is and output zeros (what pad_packed_sequence of torch's PackedSequence
    output gives); the reverse direction starts at each sequence's last step.
    Returns (output (T, B, D * P), h_n) or, for LSTM, (output, (h_n, c_n)); computed in float64
    and rounded once to the input's dtype."""
    if mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        raise ValueError(f"reference.rnn_sequence: mode must be LSTM, GRU, RNN_TANH or RNN_RELU, but got {mode!r}")
    lstm = mode == "LSTM"
    h0, c0 = hx if lstm else (hx, None)
    if input.dim() != 3:
        raise ValueError(f"reference.rnn_sequence: input must be (T, B, I), but got {tuple(input.shape)}")
    steps, batch = input.shape[0], input.shape[1]
    d = 2 if bidirectional else 1
    if len(weights) != num_layers * d:
        raise ValueError(f"reference.rnn_sequence: weights must hold {num_layers * d} layers x directions, "
                         f"but got {len(weights)}")
    lens = torch.full((batch,), steps) if lengths is None else torch.as_tensor(lengths)
    x = _f64(input)
    hs, cs = [], []
    for layer in range(num_layers):
        outs = []
        for direction in range(d):
            idx = layer * d + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = (_f64(w) for w in weights[idx])
            h = _f64(h0[idx])
            c = _f64(c0[idx]) if lstm else None
            out = [None] * steps
            for t in (range(steps - 1, -1, -1) if direction else range(steps)):
                active = (t < lens).unsqueeze(1).to(x.device)
                if lstm:
                    gates = _linear(x[t], w_ih, b_ih) + _linear(h, w_hh, b_hh)
                    i, f, g, o = gates.chunk(4, dim=1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(c_new)
                    if w_hr is not None:
                        h_new = h_new @ w_hr.t()
                    c = torch.where(active, c_new, c)
                elif mode == "GRU":
                    h_new = gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
                else:
                    cell = rnn_tanh_cell if mode == "RNN_TANH" else rnn_relu_cell
                    h_new = cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
                h = torch.where(active, h_new, h)
                out[t] = torch.where(active, h_new, torch.zeros_like(h_new))
            outs.append(torch.stack(out) if steps else x.new_zeros((0, batch, h.shape[1])))
            hs.append(h)
            cs.append(c)
        x = torch.cat(outs, dim=2)
    dtype = input.dtype
    h_n = torch.stack(hs).to(dtype)
    return x.to(dtype), ((h_n, torch.stack(cs).to(dtype)) if lstm else h_n)
