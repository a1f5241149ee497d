"""convrnn_kernels: hand-written CPU and CUDA kernels for the layers of convolutional and
recurrent networks, registered with the PyTorch dispatcher (namespace ``convrnn``) and
differentiable.

>>> import convrnn_kernels as ck
>>> y = ck.max_pool2d(x, 3, stride=2)          # like torch.nn.functional.max_pool2d
>>> pool = ck.nn.MaxPool2d(3, stride=2)        # like torch.nn.MaxPool2d
>>> conv = ck.nn.Conv2d(3, 64, 7, stride=2, padding=3)   # like torch.nn.Conv2d
"""
import torch

from . import _C  # noqa: F401  (loading it registers the convrnn ops)
from .ops.avg_pool2d import avg_pool2d
from .ops.conv2d import conv2d
from .ops.local_response_norm import local_response_norm
from .ops.max_pool2d import max_pool2d
from .ops.rnn_cells import gru_cell, lstm_cell, rnn_relu_cell, rnn_tanh_cell
from .ops import rnn_layers as _rnn_layers  # noqa: F401  (fake kernels and autograd of the layer ops)
from .ops import autocast as _autocast  # noqa: F401  (torch.autocast rules of the ops)
from . import nn, reference  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info():
    """What this build contains: "cuda" (CUDA kernels compiled in), "cuda_archs", "openmp",
    "version", "torch" (the running torch), "torch_built_against", "cpu_kernels" (the CPU
    kernel variant the loader picked on this machine)."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    return info


__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "local_response_norm", "lstm_cell", "gru_cell", "rnn_tanh_cell",
           "rnn_relu_cell", "nn", "reference", "build_info"]
