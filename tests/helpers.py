"""Shared by the test files: devices, dtypes, input builders and the comparison rules.

Comparison rules
  float32/float64   ours vs torch (and vs the reference) with tight per-dtype tolerances.
  float16/bfloat16  judged against PyTorch's own error in that dtype: with ref32 the torch op
                    in float32 on the upcast input, max|ours - ref32| must be at most
                    2 * max|torch_half - ref32| plus one ulp of the largest |ref32|.
"""
import contextlib
import importlib.util
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

FLOAT_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = FLOAT_DTYPES + HALF_DTYPES
BAD_DTYPES = [torch.int64, torch.bool]

# rtol/atol of ours vs torch in the same dtype (different summation orders only)
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}

BAD_INPUT_ERRORS = (RuntimeError, ValueError, TypeError)


def load_reference(name="reference"):
    """A reference module of the package (reference.py, reference_rnn.py), loaded by file path
    so that it is testable before the extension is built (importing convrnn_kernels needs the
    compiled _C)."""
    path = os.path.join(ROOT, "convrnn_kernels", name + ".py")
    spec = importlib.util.spec_from_file_location(f"convrnn_{name}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def import_ck(*attrs):
    """convrnn_kernels, or skip the calling module when it is not built / lacks `attrs`."""
    try:
        import convrnn_kernels as ck
    except ImportError as e:  # not built yet: skip rather than error the whole run
        pytest.skip(f"convrnn_kernels does not import: {e}", allow_module_level=True)
    missing = [a for a in attrs if not hasattr(ck, a)]
    if missing:
        pytest.skip(f"convrnn_kernels lacks {missing}", allow_module_level=True)
    return ck


@contextlib.contextmanager
def num_threads(n):
    """Run the block with n intra-op CPU threads (determinism must hold with several)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make_input(shape, dtype=torch.float32, device="cpu", *, channels_last=False, noncontig=False,
               distinct=False, seed=0, low=None, high=None):
    """A test input.  distinct: a random permutation of 0..numel-1 scaled into [-1, 1) (no
    ties, for max-pool gradchecks); low/high: integers in [low, high) (many ties)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if distinct:
        x = (torch.randperm(n, generator=g).to(torch.float64) / max(n, 1) * 2 - 1).reshape(shape)
    elif low is not None:
        x = torch.randint(low, high, tuple(shape), generator=g).to(torch.float64)
    else:
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if noncontig:
        # a view whose last two dims are swapped and which skips every other channel
        big = torch.cat([x, x], dim=-3) if x.dim() >= 3 else x
        x = big.transpose(-1, -2).contiguous().transpose(-1, -2)
        if x.dim() >= 3:
            x = x.narrow(-3, 0, shape[-3])
        assert not x.is_contiguous() or x.numel() <= 1
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def grad_output_like(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)


def forward_backward(fn, x, gout=None, seed=1):
    """(output(s), grad of x) of fn(x) for a random grad_output; fn returns a tensor or
    (tensor, indices)."""
    x = x.detach().requires_grad_(True)  # a leaf with the same strides
    res = fn(x)
    out = res[0] if isinstance(res, tuple) else res
    if gout is None:
        gout = grad_output_like(out, seed)
    (gx,) = torch.autograd.grad(out, x, gout, allow_unused=False)
    return res, gx, gout


def half_atol(dtype, ref):
    """One ulp (machine epsilon times magnitude) of the largest |ref|, at least of 1."""
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    return torch.finfo(dtype).eps * scale


def assert_half_ok(ours, torch_half, ref32, what=""):
    """Half-precision rule: our error vs the fp32 reference <= 2x torch's own + one ulp."""
    assert ours.dtype == torch_half.dtype and ours.shape == ref32.shape, what
    ref32 = ref32.float()
    ours32, theirs32 = ours.float(), torch_half.float()
    assert torch.equal(ours32.isnan(), ref32.isnan()), f"{what}: NaN pattern differs"
    finite = ~ref32.isnan()
    if not finite.any():
        return
    err_ours = (ours32 - ref32)[finite].abs().max().item()
    err_torch = (theirs32 - ref32)[finite].abs().max().item()
    bound = 2 * err_torch + half_atol(ours.dtype, ref32[finite])
    assert err_ours <= bound, (f"{what}: {ours.dtype} error {err_ours:.3g} > 2 x torch's "
                               f"{err_torch:.3g} + ulp (bound {bound:.3g})")


def assert_close(ours, expected, what=""):
    """Same-dtype comparison for float32/float64 (NaN equal NaN)."""
    assert ours.shape == expected.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    assert ours.dtype == expected.dtype, f"{what}: dtype {ours.dtype} != {expected.dtype}"
    rtol, atol = TOL[ours.dtype]
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_same_format(out, inp, what=""):
    """The output keeps the input's memory format (channels_last in, channels_last out)."""
    if inp.dim() == 4 and out.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last) \
            and not inp.is_contiguous() and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output is not channels_last"


def raises_op_arg(op, arg):
    """pytest.raises for a bad-input error whose message names `op` and then `arg`."""
    return pytest.raises(BAD_INPUT_ERRORS, match=rf"(?s)convrnn\.{re.escape(op)}.*{arg}")


COMPILE_BACKEND = os.environ.get("CONVRNN_TEST_COMPILE_BACKEND", "inductor")


# ---- shared grids -----------------------------------------------------------------------

# max pool: (shape, kernel_size, stride, padding, dilation, ceil_mode)
MAX_CONFIGS = [
    ((2, 3, 8, 8), 2, None, 0, 1, False),               # VGG 2x2/2
    ((2, 3, 13, 13), 3, 2, 0, 1, False),                # AlexNet 3x3/2 overlapping
    ((2, 3, 16, 16), 3, 2, 1, 1, False),                # ResNet stem 3x3/2 pad 1
    ((2, 3, 7, 9), (3, 2), (2, 1), (1, 0), 1, True),    # odd sizes, ceil
    ((1, 2, 1, 11), (1, 3), (1, 2), 0, 1, False),       # 1xN
    ((1, 2, 11, 1), (3, 1), 2, (1, 0), 1, True),        # Nx1
    ((2, 2, 9, 10), 3, 1, 1, 2, False),                 # dilation
    ((2, 2, 10, 7), (2, 3), (3, 2), 1, (2, 1), True),   # everything mixed
    ((3, 7, 9), 3, 2, 1, 1, True),                      # unbatched (C, H, W)
    ((1, 1, 5, 5), 2, 2, 1, 1, True),                   # ceil mode drops the last window
    ((2, 1, 4, 4), 5, 1, 2, 1, False),                  # window larger than the input
    ((1, 3, 6, 6), 1, 1, 0, 1, False),                  # 1x1 kernel
    ((1, 3, 5, 70), 3, 1, 1, 1, False),                 # wide rows: vectorised interior + tails
    ((2, 2, 6, 67), (2, 3), 2, 1, (1, 2), True),        # wide, stride 2, dilation
    ((1, 2, 4, 71), (1, 4), (1, 3), (0, 2), 1, True),   # wide, stride 3
    ((2, 37, 5, 6), 3, 2, 1, 1, False),                 # many channels (channels_last vectors + tail)
]

# avg pool geometry: (shape, kernel_size, stride, padding); crossed with the options below
AVG_GEOMETRIES = [
    ((2, 3, 8, 8), 2, None, 0),                  # VGG-like 2x2/2
    ((2, 3, 13, 13), 3, 2, 0),                   # overlapping 3x3/2
    ((2, 3, 16, 16), 3, 2, 1),                   # 3x3/2 pad 1
    ((2, 3, 7, 9), (3, 2), (2, 1), (1, 0)),      # odd sizes
    ((1, 2, 1, 11), (1, 3), (1, 2), (0, 1)),     # 1xN
    ((3, 7, 9), (2, 4), (3, 1), (1, 2)),         # unbatched (C, H, W)
    ((1, 1, 5, 5), 2, 2, 1),                     # ceil mode drops the last window
    ((2, 1, 4, 4), 5, 2, 2),                     # window larger than the input
    ((1, 3, 5, 70), 3, 1, 1),                    # wide rows: vectorised interior + tails
    ((2, 2, 6, 67), (2, 3), 2, (1, 1)),          # wide, stride 2
    ((1, 2, 4, 71), (1, 4), (1, 3), (0, 2)),     # wide, stride 3
    ((2, 37, 5, 6), 3, 2, 1),                    # many channels (channels_last vectors + tail)
]
AVG_OPTIONS = [  # (ceil_mode, count_include_pad, divisor_override)
    (False, True, None), (True, True, None), (False, False, None), (True, False, None),
    (False, True, 3), (True, False, 5), (True, True, -2),
]

# LRN: (shape, size, alpha, beta, k)
LRN_CONFIGS = [
    ((2, 8, 5, 5), 5, 1e-4, 0.75, 2.0),      # AlexNet
    ((2, 8, 5, 5), 5, 1e-4, 0.75, 1.0),      # torch's defaults, size 5
    ((2, 4, 6), 3, 0.1, 0.5, 1.0),           # 3-D (N, C, L)
    ((1, 3, 3, 4, 5), 2, 0.5, 0.75, 1.0),    # 5-D, even size
    ((2, 5, 3, 3), 1, 0.3, 0.75, 1.0),       # size 1
    ((2, 3, 4, 4), 7, 1.0, 1.0, 0.5),        # size larger than C
    ((2, 6, 4, 4), 4, 2.0, 0.75, 1.0),       # strong normalisation, even size
    ((3, 10, 2, 3), 6, 0.05, 1.5, 3.0),      # beta > 1
    ((2, 37, 3, 5), 5, 1e-2, 0.75, 1.0),     # many channels
    ((1, 4, 3, 70), 3, 0.2, 0.75, 1.0),      # wide rows
]


def cfg_id(cfg):
    return "-".join(str(c).replace(" ", "") for c in cfg)


def special_input(kind, shape, dtype=torch.float32, device="cpu", seed=0):
    """Inputs that break max kernels: ties, NaNs (several per window), -inf and +inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, shape, generator=g).to(torch.float64)
    r = torch.rand(shape, generator=g)
    if kind == "ties":
        pass
    elif kind == "nan":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x[r < 0.15] = float("nan")
    elif kind == "nan_ties":
        x[r < 0.3] = float("nan")
    elif kind == "inf":
        x[r < 0.2] = float("inf")
        x[r > 0.8] = -float("inf")
    elif kind == "neg_inf":
        x[r < 0.6] = -float("inf")
        x[..., : shape[-2] // 2, :] = -float("inf")      # whole windows of -inf
    elif kind == "all_neg_inf":
        x.fill_(-float("inf"))
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


SPECIAL_KINDS = ["ties", "nan", "nan_ties", "inf", "neg_inf", "all_neg_inf"]


def grad_output_variants(out):
    """grad_outputs in the layouts autograd hands to a backward: expanded from a sum (all
    strides 0), the other memory format, transposed, and broadcast over the batch."""
    g = grad_output_like(out, seed=3)
    other = torch.contiguous_format if g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last) \
        and not g.is_contiguous() else (torch.channels_last if g.dim() == 4 else torch.contiguous_format)
    return {
        "sum": torch.ones((), dtype=out.dtype, device=out.device).expand(out.shape),
        "other_format": g.contiguous(memory_format=other),
        "transposed": g.transpose(-1, -2).contiguous().transpose(-1, -2),
        "batch_broadcast": g[:1].expand(out.shape),
    }


class switched:
    """Sets a runtime switch op (mode 1 on, 0 off; it returns the mode before and its launches
    so far) inside the block; .launches counts the launches the block made."""

    def __init__(self, op, on):
        self.op, self.on = op, on

    def __enter__(self):
        self.before, self.start = self.op(1 if self.on else 0)
        return self

    def __exit__(self, *exc):
        _, end = self.op(self.before)
        self.launches = end - self.start
