"""torch.autocast rules for the convrnn ops: each op casts its inputs as torch's autocast casts
the op it replaces, so a converted model gives the output dtypes torch's model gives.

torch's policy (aten/src/ATen/autocast_mode.cpp, cudnn/AutocastRNN.cpp, torch 2.x):
  conv2d             lower precision on CPU and CUDA (the autocast dtype).
  max/avg_pool2d     on neither list: they run in their input's dtype (no rule here).
  local_response_norm  F.local_response_norm's pieces: avg_pool3d (CPU fp32 list) or pow (CUDA
                     fp32 list) make its result float32, except a 3-D input on the CPU (avg_pool2d,
                     no cast) and an empty input (returned as it is).
  cells (CUDA)       lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell: lower precision.
  cells (CPU)        not listed: torch runs the composite, whose F.linear gate products are lower
                     precision and whose remaining arithmetic promotes with the state, so
                     LSTMCell/GRUCell give float32 with a float32 state and RNNCell the lower type.
                     Our whole-cell ops (gate products inside) take autocast's `promote` policy over
                     input and state (LSTM, GRU) or the lower type (RNN): torch's output dtypes,
                     the products in the promoted type (no larger error).  The step ops of the
                     layer loops promote their gates and state likewise.
  layers (CUDA)      cuDNN's RNN (and the fused-cell fallback) casts to lower precision.
  layers (CPU)       LSTM runs through mkldnn_rnn_layer (lower list) when oneDNN is enabled and the
                     input is not packed and has no projection; otherwise through composite cells
                     that promote with the state, a projection (F.linear) giving a lower-precision
                     output and h_n beside a promoted c_n.  RNN's composite cells stay in the lower
                     type; GRU's promote with the state, like GRUCell.
The layer ops' backwards run with autocast off, in the dtype their forward chose: their C++
loops call at::mm and at::addmm (lower-precision lists) and sum (CUDA's float32 list), which
autocast would otherwise recast when backward() is called inside an autocast region.

A Python kernel on the AutocastCPU/AutocastCUDA keys only runs while autocast is on, so the
cost outside autocast is nil.  torch.library.register_autocast casts to one fixed dtype chosen
at registration; these kernels read the region's dtype (torch.get_autocast_dtype) per call."""
import torch

OPS = torch.ops.convrnn
_LIB = torch.library.Library("convrnn", "IMPL")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _eligible(t, device_type):
    """torch's is_autocast_eligible: a floating tensor on the autocast device, float64 excepted."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64)


def _cast(value, dtype, device_type):
    if _eligible(value, device_type):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype, device_type) for v in value)
    return value


# ---- policies: (args, device_type) -> the dtype to cast floating inputs to, or None (no cast), or
# (that dtype, {output index: dtype to cast that output to}) ----

def lower(args, device_type):
    return torch.get_autocast_dtype(device_type)


def promote(*indices):
    """autocast's promote policy over args[indices]: float32 if any of them is, else the lower type."""
    def policy(args, device_type):
        wide = any(_eligible(args[i], device_type) and args[i].dtype == torch.float32 for i in indices)
        return torch.float32 if wide else torch.get_autocast_dtype(device_type)
    return policy


def lstm_cpu(args, device_type):
    """torch.nn.LSTM on the CPU (see the header; torch's oneDNN test also looks at the input's
    dtype, which is float32 here as a rule); the projection case also names the outputs
    (output, h_n) that torch's composite gives in the lower type."""
    w_hr, batch_sizes = args[6], args[7]
    if w_hr is None and batch_sizes is None and torch.backends.mkldnn.is_available() \
            and torch.backends.mkldnn.enabled:
        return lower(args, device_type)
    dtype = promote(0, 1, 2)(args, device_type)
    return (dtype, {0: lower(args, device_type), 1: lower(args, device_type)}) if w_hr is not None else dtype


def lrn(args, device_type):
    input = args[0]
    if input.numel() == 0 or (device_type == "cpu" and input.dim() == 3):
        return None
    return torch.float32


def no_cast(args, device_type):
    return None


# op: (CPU policy, CUDA policy)
POLICIES = {
    "conv2d": (lower, lower),
    "local_response_norm": (lrn, lrn),
    # the whole-cell ops (what ck.lstm_cell & co. call): torch's CPU composite computes the gate
    # products in the lower type and promotes the rest with the state; ours computes everything in
    # the promoted type (same output dtype, no larger error).  CUDA: torch's fused cells, lower.
    "lstm_cell": (promote(0, 1, 2), lower),
    "gru_cell": (promote(0, 1), lower),
    "rnn_cell": (lower, lower),
    "lstm_cell_backward": (no_cast, no_cast),
    "gru_cell_backward": (no_cast, no_cast),
    "rnn_cell_backward": (no_cast, no_cast),
    # the step ops the layer loops call
    "lstm_cell_fused": (promote(0, 1, 2), lower),
    "gru_cell_fused": (promote(0, 1, 2), lower),
    "rnn_cell_fused": (promote(0, 1), lower),
    "lstm_layer": (lstm_cpu, lower),
    "gru_layer": (promote(0, 1), lower),
    "rnn_layer": (lower, lower),
    "lstm_layer_backward": (no_cast, no_cast),
    "gru_layer_backward": (no_cast, no_cast),
    "rnn_layer_backward": (no_cast, no_cast),
}


def _kernel(op, policy, device_type):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _KEYS[device_type]))

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            dtype = policy(args, device_type)
            dtype, recast = dtype if isinstance(dtype, tuple) else (dtype, {})
            if dtype is not None:
                args = _cast(args, dtype, device_type)
                kwargs = {k: _cast(v, dtype, device_type) for k, v in kwargs.items()}
            out = op(*args, **kwargs)
            if recast:
                out = tuple(_cast(t, recast[i], device_type) if i in recast else t for i, t in enumerate(out))
            return out
    return kernel


for _name, _policies in POLICIES.items():
    for _device_type, _policy in zip(("cpu", "cuda"), _policies):
        _LIB.impl(_name, _kernel(getattr(OPS, _name).default, _policy, _device_type), _KEYS[_device_type])
