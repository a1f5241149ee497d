"""RNNCell, GRUCell and LSTMCell drop-ins (torch.nn's parameters, state_dict and repr)."""
import torch

from ..ops.rnn_cells import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell


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
