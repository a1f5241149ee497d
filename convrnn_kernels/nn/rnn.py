"""RNNCell, GRUCell and LSTMCell, RNN, GRU and LSTM drop-ins (torch.nn's parameters, state_dict
and repr)."""
import torch
from torch.nn.utils.rnn import PackedSequence

from ..ops.rnn_cells import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell
from ..ops.rnn_layers import OP_NAMES, check_sequence_args, run_layers


def _zeros(input, hidden_size):
    return torch.zeros(*input.shape[:-1], hidden_size, dtype=input.dtype, device=input.device)


class RNNCell(torch.nn.RNNCell):
    """torch.nn.RNNCell running convrnn's fused rnn cell."""

    def forward(self, input, hx=None):
        hx = _zeros(input, self.hidden_size) if hx is None else hx
        cell = rnn_tanh_cell if self.nonlinearity == "tanh" else rnn_relu_cell
        return cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell running convrnn's fused GRU cell."""

    def forward(self, input, hx=None):
        hx = _zeros(input, self.hidden_size) if hx is None else hx
        return gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell running convrnn's fused LSTM cell."""

    def forward(self, input, hx=None):
        if hx is None:
            hx = (_zeros(input, self.hidden_size), _zeros(input, self.hidden_size))
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


# ---- whole-sequence layers ----

def _weights(module):
    """Per layer and direction: (w_ih, w_hh, b_ih, b_hh, w_hr) and their parameter names."""
    weights, names = [], []
    for layer in range(module.num_layers):
        for direction in range(2 if module.bidirectional else 1):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            ns = [f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}", f"weight_hr{sfx}"]
            if not module.bias:
                ns[2] = ns[3] = None
            if not getattr(module, "proj_size", 0):
                ns[4] = None
            weights.append(tuple(None if n is None else getattr(module, n) for n in ns))
            names.append(tuple(ns))
    return weights, names


def _sequence_forward(module, mode, input, hx):
    """torch.nn.RNNBase.forward's handling of batch_first, unbatched and PackedSequence input
    and of hx, around convrnn's layer ops.  hx: a tensor, or (h, c) for LSTM, or None."""
    lstm = mode == "LSTM"
    op = OP_NAMES[mode]
    d = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0)
    real_hidden = proj if proj > 0 else module.hidden_size
    packed = isinstance(input, PackedSequence)
    if packed:
        input, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
        is_batched = True
    else:
        batch_sizes = sorted_indices = unsorted_indices = None
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"convrnn.{op}: input must be a tensor or a PackedSequence, but got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"convrnn.{op}: input must be 2-D (unbatched) or 3-D, but got {input.dim()}-D")
        is_batched = input.dim() == 3
        if input.shape[1 if is_batched and module.batch_first else 0] == 0:
            raise RuntimeError(f"convrnn.{op}: input must have a sequence length larger than 0 (as torch's RNNs), "
                               f"but got input of shape {tuple(input.shape)}")
        if not is_batched:
            input = input.unsqueeze(1)  # (T, 1, I)
        elif module.batch_first:
            input = input.transpose(0, 1)  # the layer ops run time-major
        batch = input.shape[1]
    if hx is None:
        h = torch.zeros(module.num_layers * d, batch, real_hidden, dtype=input.dtype, device=input.device)
        c = torch.zeros(module.num_layers * d, batch, module.hidden_size, dtype=input.dtype,
                        device=input.device) if lstm else None
    else:
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"convrnn.{op}: hx must be a tuple (h_0, c_0), but got {type(hx).__name__}")
            h, c = hx
        else:
            h, c = hx, None
        for name, t in (("hx", h), ("cx", c)) if lstm else (("hx", h),):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"convrnn.{op}: {name} must be a tensor, but got {type(t).__name__}")
            want = 3 if is_batched else 2
            if t.dim() != want:
                raise RuntimeError(f"convrnn.{op}: {name} must be {want}-D for {'batched 3-D' if is_batched else 'unbatched 2-D'}"
                                   f" input, but got a {t.dim()}-D tensor")
        if not is_batched:
            h = h.unsqueeze(1)
            c = c.unsqueeze(1) if lstm else None
        if sorted_indices is not None:
            h = h.index_select(1, sorted_indices)
            c = c.index_select(1, sorted_indices) if lstm else None
    weights, names = _weights(module)
    check_sequence_args(mode, input, h, c, weights, names, input_size=module.input_size,
                        hidden_size=module.hidden_size, num_layers=module.num_layers,
                        bidirectional=module.bidirectional, proj_size=proj, batch=batch)
    out, h_n, c_n = run_layers(mode, input, h, c, weights, batch_sizes=batch_sizes, num_layers=module.num_layers,
                               bidirectional=module.bidirectional, dropout=module.dropout, training=module.training)
    if packed:
        out = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if lstm else None
    else:
        if not is_batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else None
        elif module.batch_first:
            out = out.transpose(0, 1)
    return out, ((h_n, c_n) if lstm else h_n)


class RNN(torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) running convrnn's whole-sequence layer op per layer and direction."""

    def forward(self, input, hx=None):
        mode = "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"
        return _sequence_forward(self, mode, input, hx)


class GRU(torch.nn.GRU):
    """torch.nn.GRU running convrnn's whole-sequence layer op per layer and direction."""

    def forward(self, input, hx=None):
        return _sequence_forward(self, "GRU", input, hx)


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM (proj_size included) running convrnn's whole-sequence layer op per layer
    and direction."""

    def forward(self, input, hx=None):
        return _sequence_forward(self, "LSTM", input, hx)
