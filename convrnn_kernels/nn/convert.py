"""convert(): swap a model's torch.nn layers for the convrnn drop-ins, or back.

A module is converted in place, by assigning its class.  The drop-ins subclass their torch.nn
namesakes and add no state of their own, only forward, so the object keeps its identity and
with it everything that refers to it or that it holds: the same Parameter objects and buffers
(optimizers and state_dicts keep working), its training flag, hooks and their removable
handles, extra attributes, the RNN modules' _flat_weights (lists of references to the
Parameters), and its place in every parent, including modules shared by several parents.
torch's LazyModuleMixin turns a module into its cls_to_become the same way."""
import warnings

import torch

from .conv import Conv2d
from .normalization import LocalResponseNorm
from .pooling import AvgPool2d, MaxPool2d
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

TORCH_TO_OURS = {
    torch.nn.Conv2d: Conv2d,
    torch.nn.MaxPool2d: MaxPool2d,
    torch.nn.AvgPool2d: AvgPool2d,
    torch.nn.LocalResponseNorm: LocalResponseNorm,
    torch.nn.RNNCell: RNNCell,
    torch.nn.GRUCell: GRUCell,
    torch.nn.LSTMCell: LSTMCell,
    torch.nn.RNN: RNN,
    torch.nn.GRU: GRU,
    torch.nn.LSTM: LSTM,
}
OURS_TO_TORCH = {ours: theirs for theirs, ours in TORCH_TO_OURS.items()}

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _kernel_devices():
    """Device types our ops run on in this build ("meta": shapes only, through the fake kernels)."""
    devices = {"cpu", "meta"}
    if torch._C._dispatch_has_kernel_for_dispatch_key("convrnn::conv2d", "CUDA"):
        devices.add("cuda")
    return devices


def _type_name(cls):
    """torch.nn.Conv2d rather than torch.nn.modules.conv.Conv2d where the short name is public."""
    if cls in OURS_TO_TORCH:
        return f"convrnn_kernels.nn.{cls.__name__}"
    if getattr(torch.nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _why_not(module, table, devices):
    """None when `module` is converted by `table`, else why it is left as it is (or "" when it
    is simply not one of the layers `table` converts)."""
    cls = type(module)
    if cls not in table:
        bases = [base for base in table if isinstance(module, base)]
        if not bases or (table is TORCH_TO_OURS and isinstance(module, tuple(OURS_TO_TORCH))):
            return ""  # another kind of module, or already ours
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
            return f"a lazy {_type_name(bases[0])} not initialised yet: convert after its first forward"
        return f"a subclass of {_type_name(bases[0])}, which convert() leaves alone (it swaps exact types only)"
    if table is OURS_TO_TORCH:
        return None  # torch serves every dtype and device
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
            return f"{name} is not initialised yet"
        if t.is_floating_point() or t.is_complex():
            if t.dtype not in DTYPES:
                return f"{name} is {t.dtype}; the kernels take float32, float64, float16 and bfloat16"
            if t.device.type not in devices:
                return f"{name} is on {t.device}; this build's kernels run on {', '.join(sorted(devices))}"
    return None


def convert(model, inverse=False):
    """Swaps every torch.nn Conv2d, MaxPool2d, AvgPool2d, LocalResponseNorm, RNNCell, GRUCell,
    LSTMCell, RNN, GRU and LSTM in `model` (the root included) for its convrnn_kernels.nn
    drop-in, in place, and returns the model.  inverse=True swaps ours back for torch's.

    Only exact types are swapped.  A subclass of one of those layers (it may have its own
    forward), a lazy module not initialised yet, or a layer whose parameters have a dtype or sit
    on a device that the kernels do not serve stays as it is; one warning per call names every
    such module (its qualified name and type) and why."""
    table = OURS_TO_TORCH if inverse else TORCH_TO_OURS
    devices = _kernel_devices()
    left = []
    for name, module in model.named_modules():
        why = _why_not(module, table, devices)
        if why is None:
            module.__class__ = table[type(module)]
        elif why:
            left.append(f"'{name or '<root>'}' ({_type_name(type(module))}: {why})")
    if left:
        warnings.warn(f"convrnn_kernels.nn.convert{'(inverse=True)' if inverse else ''} left {len(left)} "
                      f"module(s) as they are: " + "; ".join(left), stacklevel=2)
    return model
