"""Benchmark machinery shared by every op: cases, correctness check, timing, rooflines.

Knows nothing about any particular op.  A case file (pooling.py, lrn.py, ...) describes each
layer shape as a `Case`: how to make its inputs, our call, torch's call, and optionally its
FLOP count and speed goals.  `run` expands the cases over devices, dtypes, memory formats and
directions, checks ours against torch before timing anything, then times both interleaved.
Progress bar, table, summary and JSON output live in report.py.
"""
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("nchw", "channels_last")
DIRECTIONS = ("forward", "forward+backward")

# (rtol, atol) per dtype: |ours - torch| <= atol * max(1, max|torch|) + rtol * |torch|.
# atol is scaled by the result's largest magnitude so large gradients are not judged by a
# tolerance meant for O(1) values.  Half types differ from torch by a few units in the last
# place (fp16 ~1e-3, bf16 ~8e-3 near 1), because ours and torch round intermediates
# differently (e.g. torch's LRN is composed of half-precision ops, ours accumulates in float).
TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5),
              torch.float16: (1e-2, 1e-3), torch.bfloat16: (3e-2, 1e-2)}

# Where the plain tolerance fails, results are judged against the same call in a wider dtype:
# half types against float32 (the tests' rule), float32 against float64 (long reductions in a
# different order, and TF32 when --tf32 on).
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}

# Bytes-moved model for GB/s, recorded in the JSON as well.
BYTES_FORMULA = ("forward = bytes(inputs) + bytes(outputs); forward+backward = forward + "
                 "bytes(grad_outputs) + bytes(differentiable inputs, read again by backward) + "
                 "bytes(grad_inputs); GB/s = bytes / our median time, 1 GB = 1e9 bytes")


@dataclass(frozen=True)
class Goal:
    """A speed goal the project tracks; None fields match anything.  Checked against the
    geomean over shapes of one op x format x direction x device x dtype group."""
    device: Optional[str] = None
    dtype: Optional[str] = None
    format: Optional[str] = None
    direction: Optional[str] = None
    speedup: Optional[float] = None        # torch ms / ours ms at least this
    roofline_pct: Optional[float] = None   # % of the measured copy bandwidth at least this
    min_speedup: Optional[float] = None    # and no shape of the group below this speed-up
    label: Optional[str] = None            # judged on this layer's rows only (None: all shapes)

    def matches(self, key: Dict[str, str]) -> bool:
        return all(getattr(self, k) in (None, key[k]) for k in ("device", "dtype", "format", "direction"))

    def describe(self) -> str:
        parts = []
        if self.speedup is not None:
            parts.append(f">={self.speedup:g}x")
        if self.roofline_pct is not None:
            parts.append(f">={self.roofline_pct:g}% roofline")
        if self.min_speedup is not None:
            parts.append(f"each >={self.min_speedup:g}x")
        return (f"{self.label}: " if self.label else "") + " and ".join(parts)


@dataclass
class Case:
    """One layer shape of one op.

    make_inputs(device, dtype, fmt) returns the op's tensor arguments (fmt is one of FORMATS,
    or None for format-less cases); ours(*inputs) and torch_fn(*inputs) return a tensor or a
    tuple of tensors.  grad_inputs are the indices of the inputs differentiated in
    forward+backward.  flops, when given, maps a direction to its FLOP count and switches on
    the compute roofline.  check_fn, when given, replaces torch_fn as the answer ours is
    checked against (where torch's own kernel is known to be wrong); torch_fn is still the one
    timed."""
    op: str
    label: str                      # the layer, e.g. "VGG 2x2/2"
    shape: str                      # printed shape, e.g. "32x64x112x112 k2 s2 p0"
    params: dict
    make_inputs: Callable[[torch.device, torch.dtype, Optional[str]], List[torch.Tensor]]
    ours: Callable
    torch_fn: Callable
    grad_inputs: Tuple[int, ...] = (0,)
    formats: Optional[Tuple[str, ...]] = FORMATS   # None: memory format does not apply
    flops: Optional[Dict[str, float]] = None
    goals: Tuple[Goal, ...] = ()
    check_fn: Optional[Callable] = None


def batch(n: int, quick: bool) -> int:
    """Batch size of a case: quick mode divides it by 4."""
    return max(1, n // 4) if quick else n


def to_format(t: torch.Tensor, fmt: Optional[str]) -> torch.Tensor:
    if fmt == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# ---- correctness --------------------------------------------------------------------------

def _as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compare(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], dtype) -> Tuple[bool, float, Optional[str]]:
    """Do all pairs agree within the dtype's tolerance?  Returns (ok, max abs error, note);
    the note names a shape mismatch, or outputs laid out in memory unlike torch's (allowed,
    but worth knowing: torch keeps channels_last inputs channels_last)."""
    rtol, atol = TOLERANCES[dtype]
    ok, worst, notes = len(ours) == len(ref), 0.0, []
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a is None or b is None or a.shape != b.shape:
            if not (a is None and b is None):
                ok, worst = False, math.inf
                notes.append(f"result {i}: shape {None if a is None else tuple(a.shape)}, torch "
                             f"{None if b is None else tuple(b.shape)}")
            continue
        if a.numel() > 1 and a.stride() != b.stride():
            notes.append(f"result {i}: strides {a.stride()}, torch {b.stride()}")
        if not b.is_floating_point():
            ok = ok and bool(torch.equal(a, b))
            continue
        a, b = a.detach().double(), b.detach().double()
        # Equal values (infinities included) and NaN on both sides agree; NaN on one side
        # becomes an infinite error.
        err = torch.where((a == b) | (torch.isnan(a) & torch.isnan(b)), 0.0, (a - b).abs())
        err = err.nan_to_num(nan=math.inf)
        if err.numel():
            mag = b.abs().nan_to_num(0.0, 0.0, 0.0)
            worst = max(worst, err.max().item())
            ok = ok and bool((err <= atol * max(1.0, mag.max().item()) + rtol * mag).all())
    return ok, worst, "; ".join(notes) or None


def _forward(fn, inputs, backward: bool, grads=None):
    """One call of fn; with backward, also backpropagates grads into the inputs."""
    if not backward:
        with torch.no_grad():
            return _as_list(fn(*inputs))
    outs = _as_list(fn(*inputs))
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs


# ---- timing -------------------------------------------------------------------------------

@dataclass
class Step:
    """A timed call (run) and the untimed reset that precedes every call (setup)."""
    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None


def time_steps(steps: Sequence[Step], reps: int, device: torch.device,
               flush: Optional[torch.Tensor] = None) -> List[List[float]]:
    """Milliseconds of `reps` calls of each step, interleaved so that drift (clocks, other
    load) hits all steps alike; the order flips every rep so none always runs after the
    other.  CUDA: events around each call, with the L2 overwritten before it (flush) so no
    step reads what the previous one left in cache; one synchronise at the end."""
    cuda = device.type == "cuda"
    marks: List[list] = [[] for _ in steps]
    for r in range(reps):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            steps[i].setup()
            if cuda:
                if flush is not None:
                    flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[i].run()
                end.record()
                marks[i].append((start, end))
            else:
                t0 = time.perf_counter()
                steps[i].run()
                marks[i].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        return [[s.elapsed_time(e) for s, e in m] for m in marks]
    return marks


def time_adaptive(steps: Sequence[Step], device, quick: bool, flush=None,
                  seconds: Optional[float] = None) -> Tuple[List[List[float]], int]:
    """All ms of each step, and the rep count.  Warm up once, time one rep to estimate the
    cost, then repeat so that the whole measurement takes ~`seconds` (default 1 s, 0.15 s
    quick), >= 3 reps."""
    time_steps(steps, 1, device, flush)
    estimate = sum(sum(t) for t in time_steps(steps, 1, device, flush)) / 1e3
    budget = seconds if seconds is not None else (0.15 if quick else 1.0)
    reps = int(min(1000, max(3, math.ceil(budget / max(estimate, 1e-6)))))
    return time_steps(steps, reps, device, flush), reps


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(step: Step, device) -> Optional[float]:
    """Extra memory one call needs at its peak (outputs and workspace), in MiB.  CUDA: the
    caching allocator's peak over what was allocated before.  CPU (Linux): the growth of the
    process's peak resident set over its resident set before the call (memory the allocator
    kept from earlier calls is reused without showing up, so this can undercount); None
    where /proc offers neither."""
    step.setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step.run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _proc_status_kib("VmRSS")
    step.run()
    peak = _proc_status_kib("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) / 1024


def copy_roofline_gbps(device: torch.device, quick: bool) -> Tuple[float, int]:
    """Memory roofline: GB/s of dst.copy_(src) for a float32 tensor of 512 MiB (CPU) or
    1 GiB (CUDA), counting the read and the write; median of several copies."""
    nbytes = (1 << 30) if device.type == "cuda" else (512 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages stays out of the timing
    step = Step(lambda: dst.copy_(src))
    ms = statistics.median(time_steps([step], 3 if quick else 7, device)[0])
    return 2 * nbytes / (ms * 1e-3) / 1e9, nbytes


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, quick: bool) -> Tuple[float, str]:
    """Compute roofline for cases that declare FLOPs: GFLOP/s of a large square matmul, in the
    case's dtype on CUDA (fp32 there runs without TF32 unless torch is told otherwise), and
    sgemm 2048^3 on CPU for every dtype but float64 (CPU half-precision gemm is not a peak
    most CPUs are built for)."""
    if device.type == "cuda":
        n, mm_dtype = 8192, dtype
    else:
        n, mm_dtype = 2048, torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    step = Step(lambda: torch.mm(a, b))
    time_steps([step], 1, device)
    ms = statistics.median(time_steps([step], 3 if quick else 7, device)[0])
    return 2 * n**3 / (ms * 1e-3) / 1e9, f"matmul {n}^3 {str(mm_dtype).replace('torch.', '')}"


class Rooflines:
    """Measures each roofline once per run, on first use."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.copy: Dict[str, dict] = {}
        self.compute: Dict[str, dict] = {}

    def copy_gbps(self, device) -> float:
        if str(device) not in self.copy:
            gbps, nbytes = copy_roofline_gbps(device, self.quick)
            self.copy[str(device)] = {"gbps": gbps, "bytes": nbytes, "what": "dst.copy_(src) float32"}
        return self.copy[str(device)]["gbps"]

    def flops_gflops(self, device, dtype) -> float:
        key = f"{device}/{str(dtype).replace('torch.', '')}"
        if key not in self.compute:
            gflops, what = matmul_peak_gflops(device, dtype, self.quick)
            self.compute[key] = {"gflops": gflops, "what": what}
        return self.compute[key]["gflops"]


# ---- runner -------------------------------------------------------------------------------

@dataclass
class Config:
    devices: List[str]
    dtypes: List[str]
    formats: List[str]
    directions: List[str]
    quick: bool = False
    seconds: Optional[float] = None  # measurement time per row; None: 1 s (0.15 s quick)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _bytes_moved(inputs, outs, grads, grad_inputs, backward: bool) -> int:
    """See BYTES_FORMULA."""
    total = _nbytes(inputs) + _nbytes(outs)
    if backward:
        diff = [inputs[i] for i in grad_inputs]
        total += _nbytes(grads) + 2 * _nbytes(diff)  # diff read again, and its grad written
    return total


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]


def groups(cases: Sequence[Case], cfg: Config):
    """(case, device, dtype, format) combinations to run; each runs every selected direction."""
    for case in cases:
        for device in cfg.devices:
            for dtype in cfg.dtypes:
                fmts = [None] if case.formats is None else [f for f in case.formats if f in cfg.formats]
                for fmt in fmts:
                    yield case, device, dtype, fmt


def _new_row(case: Case, device: str, dtype: str, fmt, direction: str) -> dict:
    keys = ("ours_ms", "torch_ms", "ours_min_ms", "torch_min_ms", "speedup", "bytes", "gbps", "roofline_pct",
            "flops", "gflops", "flops_peak_pct", "ours_peak_mib", "torch_peak_mib", "reps", "max_abs_err",
            "error", "note")
    row = {"op": case.op, "label": case.label, "shape": case.shape, "params": case.params,
           "format": fmt or "-", "dtype": dtype, "device": device, "direction": direction, "check": "ok"}
    row.update(dict.fromkeys(keys))
    return row


class _Call:
    """The inputs of one row and the calls on them.  In forward+backward the differentiable
    inputs require grad and their .grad is cleared before every call (`reset`)."""

    def __init__(self, case: Case, base: List[torch.Tensor], backward: bool):
        self.case, self.backward = case, backward
        self.inputs = [t.detach().requires_grad_(backward and i in case.grad_inputs) for i, t in enumerate(base)]
        self.diff = [self.inputs[i] for i in case.grad_inputs] if backward else []
        self.grads = None  # upstream gradients, drawn from torch's outputs in `check`

    def reset(self):
        for t in self.diff:
            t.grad = None

    def __call__(self, fn) -> List[torch.Tensor]:
        """Outputs of fn, then (forward+backward) the gradients of the differentiable inputs."""
        self.reset()
        outs = _forward(fn, self.inputs, self.backward, self.grads)
        return outs + [t.grad for t in self.diff]

    def check(self, row: dict, dtype) -> bool:
        """Runs torch then ours once on the same inputs and upstream gradients and compares.
        A failure of torch itself (a dtype or device it lacks) skips the row; a failure of
        ours marks it ERROR, a disagreement FAIL.  Half types that miss the plain tolerance
        get the tests' rule: ours within 2x torch's own error, both against the same call in
        float32, plus the tolerance.  Also fills in the row's bytes moved."""
        expected = self.case.check_fn or self.case.torch_fn
        try:
            ref = _forward(expected, self.inputs, False)
            self.grads = [torch.randn_like(o) if o.is_floating_point() else None for o in ref]
            if self.backward:
                ref = self(expected)
        except Exception as exc:  # noqa: BLE001 -- any torch failure means "cannot compare"
            row.update(check="SKIP", error="torch: " + _error_text(exc))
            return False
        try:
            got = self(self.case.ours)
        except Exception as exc:  # noqa: BLE001 -- report it and benchmark the rest
            row.update(check="ERROR", error="ours: " + _error_text(exc))
            return False
        ok, row["max_abs_err"], row["note"] = _compare(got, ref, dtype)
        if not ok and dtype in _UPCAST:
            ok, row["note"] = self._accuracy_rule(got, ref, expected, dtype)
        if not ok:
            row["check"] = "FAIL"
            return False
        outs = ref[:len(ref) - len(self.diff)]
        row["bytes"] = _bytes_moved(self.inputs, outs, self.grads if self.backward else [],
                                    self.case.grad_inputs, self.backward)
        return True

    def _accuracy_rule(self, got, ref, expected, dtype) -> Tuple[bool, str]:
        """Ours and torch's results against `expected` run on copies in a wider dtype
        (_UPCAST): ours may be off by at most twice torch's own error plus the tolerance."""
        wide = _UPCAST[dtype]
        up = _Call(self.case, [t.detach().to(wide) if t.is_floating_point() else t for t in self.inputs],
                   self.backward)
        up.grads = [None if g is None else g.to(wide) for g in self.grads]
        ref32 = up(expected)
        rtol, atol = TOLERANCES[dtype]
        if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and any(t.is_cuda for t in self.inputs):
            # TF32 (10-bit mantissa, as float16) may be used by either side, or by ours alone
            # where cuDNN picks an exact algorithm: float16's tolerance is the floor then.
            atol = max(atol, TOLERANCES[torch.float16][1])
        ok, worst_ours, worst_torch = True, 0.0, 0.0
        for a, b, r in zip(got, ref, ref32):
            if a is None or r is None or not r.is_floating_point():
                continue
            r = r.detach().double()
            e_ours = (a.detach().double() - r).abs().nan_to_num(nan=math.inf).max().item() if r.numel() else 0.0
            e_torch = (b.detach().double() - r).abs().nan_to_num(nan=math.inf).max().item() if r.numel() else 0.0
            scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
            ok = ok and e_ours <= 2 * e_torch + atol * scale
            worst_ours, worst_torch = max(worst_ours, e_ours), max(worst_torch, e_torch)
        return ok, f"accuracy rule vs {str(wide)[6:]}: ours err {worst_ours:.3g}, torch err {worst_torch:.3g}"


def _time_row(call: _Call, row: dict, dev: torch.device, dtype, quick: bool, roof, flush,
              seconds: Optional[float] = None):
    """Times ours and torch interleaved and derives speed-up, GB/s and the roofline shares."""
    steps = [Step(lambda fn=fn: _forward(fn, call.inputs, call.backward, call.grads), call.reset)
             for fn in (call.case.ours, call.case.torch_fn)]
    (ours, ref), row["reps"] = time_adaptive(steps, dev, quick, flush, seconds)
    ours_ms, torch_ms = statistics.median(ours), statistics.median(ref)
    # The minima go to the JSON too: on a noisy shared machine they are the steadier figure.
    row.update(ours_ms=ours_ms, torch_ms=torch_ms, speedup=torch_ms / ours_ms,
               ours_min_ms=min(ours), torch_min_ms=min(ref),
               ours_peak_mib=peak_mib(steps[0], dev), torch_peak_mib=peak_mib(steps[1], dev))
    row["gbps"] = row["bytes"] / (ours_ms * 1e-3) / 1e9
    row["roofline_pct"] = 100.0 * row["gbps"] / roof.copy_gbps(dev)
    flops = (call.case.flops or {}).get(row["direction"])
    if flops:
        row["flops"], row["gflops"] = flops, flops / (ours_ms * 1e-3) / 1e9
        row["flops_peak_pct"] = 100.0 * row["gflops"] / roof.flops_gflops(dev, dtype)
    call.reset()


def run_group(case: Case, device: str, dtype_name: str, fmt, cfg: Config, roof: Rooflines,
              flush=None) -> List[dict]:
    """Checks, then times, one case on one device, dtype and format, in every selected
    direction.  The inputs are drawn once (seeded) and shared by the directions."""
    dev, dtype = torch.device(device), DTYPES[dtype_name]
    torch.manual_seed(0)
    base = case.make_inputs(dev, dtype, fmt)
    rows = []
    for direction in cfg.directions:
        row = _new_row(case, device, dtype_name, fmt, direction)
        rows.append(row)
        call = _Call(case, base, direction == "forward+backward")
        if call.check(row, dtype):
            _time_row(call, row, dev, dtype, cfg.quick, roof, flush, cfg.seconds)
    return rows


class SilentProgress:
    """The progress interface `run` drives (report.Progress draws it): begin/end around each
    case, write for messages."""

    def begin(self, text: str):
        pass

    def end(self):
        pass

    def write(self, text: str):
        print(text, file=sys.stderr)

    def close(self):
        pass


def run(cases: Sequence[Case], cfg: Config, roof: Rooflines, progress=None) -> List[dict]:
    """Every selected case on every selected device, dtype, format and direction; one row per
    direction.  Rows that are not "ok" are announced through progress.write as they happen."""
    progress = progress or SilentProgress()
    flush: Dict[str, torch.Tensor] = {}
    rows = []
    for case, device, dtype, fmt in groups(cases, cfg):
        if device.startswith("cuda") and device not in flush:
            flush[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # > any L2
        progress.begin(f"{case.op} {case.shape} {fmt or '-'} {dtype} {device}")
        for row in run_group(case, device, dtype, fmt, cfg, roof, flush.get(device)):
            what = f"{row['op']} {row['shape']} {row['format']} {row['dtype']} {row['device']} {row['direction']}"
            if row["check"] != "ok":
                why = row["error"] or "; ".join(filter(None, [f"max abs err {row['max_abs_err']:.3g}", row["note"]]))
                progress.write(f"{row['check']}: {what}: {why}")
            elif row["note"]:
                progress.write(f"note: {what}: {row['note']}")
            rows.append(row)
        progress.end()
    progress.close()
    return rows
