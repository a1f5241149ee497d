"""Drop-in torch.nn modules backed by the convrnn kernels.

Each subclasses its torch.nn namesake, so the constructor signature, attributes, repr,
state_dict and isinstance checks are torch's; only forward runs our kernels.  convert(model)
swaps a model's torch.nn layers for them in place (convert(model, inverse=True) swaps back)."""
from .conv import Conv2d
from .convert import convert
from .normalization import LocalResponseNorm
from .pooling import AvgPool2d, MaxPool2d
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "LocalResponseNorm", "RNNCell", "GRUCell", "LSTMCell", "RNN", "GRU",
           "LSTM", "convert"]
