"""What the benchmark shows and keeps: progress bar, header, results table, geomean summary
against the project's goals, and the JSON file.  Works on the row dicts core.run returns."""
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .core import BYTES_FORMULA, Case


class Progress:
    """tqdm when installed; otherwise a stderr line per case as it starts, rewritten in place
    on a terminal (one line each elsewhere, so logs stay readable).  Messages go through
    `write` so they do not tear the bar."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.tty = sys.stderr.isatty()
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)
            except ImportError:
                pass

    def begin(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            return
        line = f"[{self.done + 1}/{self.total}] {text}"
        sys.stderr.write("\r" + line + "\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def end(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            sys.stderr.write(("\r\033[K" if self.enabled and self.tty else "") + text + "\n")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# ---- run metadata ---------------------------------------------------------------------------

def git_commit() -> str:
    """Short commit of the checkout holding this package, "+dirty" when tracked files differ
    from it; "unknown" outside a git checkout (an installed wheel, or no commit yet)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, capture_output=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_names(devices: Sequence[str]) -> Dict[str, str]:
    return {d: cpu_name() if d == "cpu" else torch.cuda.get_device_name(torch.device(d)) for d in devices}


def load_average() -> Optional[float]:
    """1-minute load average: other work on the CPUs makes CPU timings noisy."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def make_meta(devices: Sequence[str], quick: bool, roof, load: Optional[float],
              seconds: Optional[float] = None) -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "git_commit": git_commit(), "devices": device_names(devices),
            "threads": torch.get_num_threads(), "quick": quick, "seconds_per_row": seconds, "load_average_1min": load,
            "roofline_gbps": {d: v["gbps"] for d, v in roof.copy.items()},
            "roofline_detail": roof.copy, "compute_peak_gflops": roof.compute,
            "bytes_formula": BYTES_FORMULA}


def header(meta: dict) -> str:
    lines = [f"convrnn_kernels bench: torch {meta['torch']}, git {meta['git_commit']}, "
             f"{meta['threads']} CPU threads{', quick mode' if meta['quick'] else ''}"]
    lines += [f"  {d}: {name}" for d, name in meta["devices"].items()]
    if "tf32" in meta and any(d.startswith("cuda") for d in meta["devices"]):
        lines.append(f"  TF32 for float32 on CUDA: {'on' if meta['tf32'] else 'off'}, both sides")
    load, cpus = meta["load_average_1min"], os.cpu_count() or 1
    if load is not None and load > 0.5 * cpus:
        # Other processes on the CPUs (a build, tests) stall the op's threads at barriers.
        lines.append(f"  WARNING: 1-min load average {load:.1f} on {cpus} CPUs before the run: "
                     "CPU timings will be noisy")
    for d, v in meta["roofline_detail"].items():
        lines.append(f"  memory roofline {d}: {v['gbps']:.1f} GB/s ({v['what']}, {v['bytes'] >> 20} MiB)")
    return "\n".join(lines)


def compute_peaks(meta: dict) -> str:
    return "\n".join(f"  compute peak {k}: {v['gflops']:.0f} GFLOP/s ({v['what']})"
                     for k, v in meta["compute_peak_gflops"].items())


# ---- tables -------------------------------------------------------------------------------

def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _speedup(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


_NUMERIC = re.compile(r"-|[-+]?[\d.]+(e[-+]?\d+)?x?")  # "-" is a missing number


def render(columns, rows: List[dict]) -> str:
    """Aligned text table; columns are (title, function of a row); numbers align right."""
    cells = [[fn(r) for _, fn in columns] for r in rows]
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, (t, _) in enumerate(columns)]
    right = [any(c[i] != "-" for c in cells) and all(_NUMERIC.fullmatch(c[i]) for c in cells)
             for i in range(len(columns))]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()
    return "\n".join([line([t for t, _ in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


def results_table(rows: List[dict]) -> str:
    columns = [("op", lambda r: r["op"]), ("layer", lambda r: r["label"]), ("shape", lambda r: r["shape"]),
               ("format", lambda r: r["format"]), ("dtype", lambda r: r["dtype"]),
               ("device", lambda r: r["device"]), ("direction", lambda r: r["direction"]),
               ("ours ms", lambda r: _ms(r["ours_ms"])), ("torch ms", lambda r: _ms(r["torch_ms"])),
               ("speed-up", lambda r: _speedup(r["speedup"])),
               ("GB/s", lambda r: _num(r["gbps"], ".1f")), ("% roofline", lambda r: _num(r["roofline_pct"], ".1f"))]
    if any(r["flops"] for r in rows):
        columns += [("GFLOP/s", lambda r: _num(r["gflops"], ".1f")),
                    ("% peak", lambda r: _num(r["flops_peak_pct"], ".1f"))]
    if any(r["ours_peak_mib"] is not None for r in rows):
        columns += [("ours MiB", lambda r: _num(r["ours_peak_mib"], ".1f")),
                    ("torch MiB", lambda r: _num(r["torch_peak_mib"], ".1f"))]
    columns.append(("check", lambda r: r["check"]))
    return render(columns, rows)


# ---- summary against the goals ----------------------------------------------------------------

GROUP_KEYS = ("op", "format", "direction", "device", "dtype")


def _geomean(values: List[float]) -> Optional[float]:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: List[dict], cases: Sequence[Case]) -> List[dict]:
    """Geomean over shapes of speed-up and % roofline per op x format x direction x device x
    dtype, with each goal the op's cases declare for that group, met or not."""
    goals: Dict[str, list] = {}
    for case in cases:
        goals.setdefault(case.op, [])
        goals[case.op] += [g for g in case.goals if g not in goals[case.op]]
    grouped: Dict[tuple, List[dict]] = {}
    for r in rows:
        grouped.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    out = []
    for key, members in grouped.items():
        ok = [r for r in members if r["check"] == "ok"]
        entry = dict(zip(GROUP_KEYS, key), shapes=len(members), shapes_ok=len(ok),
                     geomean_speedup=_geomean([r["speedup"] for r in ok]),
                     geomean_roofline_pct=_geomean([r["roofline_pct"] for r in ok]),
                     min_speedup=min([r["speedup"] for r in ok], default=None), goals=[])
        for g in goals.get(entry["op"], []):
            if not g.matches(entry):
                continue
            # a goal for one layer (label) is judged on that layer's rows alone
            sel = [r for r in members if g.label is None or r["label"] == g.label]
            sel_ok = [r for r in sel if r["check"] == "ok"]
            if not sel:
                continue
            speedup = _geomean([r["speedup"] for r in sel_ok])
            met = speedup is not None and len(sel_ok) == len(sel)
            met = met and (g.speedup is None or speedup >= g.speedup)
            met = met and (g.roofline_pct is None or _geomean([r["roofline_pct"] for r in sel_ok]) >= g.roofline_pct)
            met = met and (g.min_speedup is None or min(r["speedup"] for r in sel_ok) >= g.min_speedup)
            entry["goals"].append({"goal": g.describe(), "met": met})
        out.append(entry)
    return out


def summary_table(summary: List[dict]) -> str:
    def goal_text(s):
        return "; ".join(f"{g['goal']}: {'met' if g['met'] else 'MISSED'}" for g in s["goals"]) or "-"
    columns = [(k, lambda s, k=k: s[k]) for k in GROUP_KEYS]
    columns += [("shapes ok", lambda s: f"{s['shapes_ok']}/{s['shapes']}"),
                ("geomean speed-up", lambda s: _speedup(s["geomean_speedup"])),
                ("slowest", lambda s: _speedup(s["min_speedup"])),
                ("geomean % roofline", lambda s: _num(s["geomean_roofline_pct"], ".1f")),
                ("goal", goal_text)]
    return render(columns, summary)


def write_json(path: str, meta: dict, rows: List[dict], summary: List[dict]):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows, "summary": summary}, f, indent=1)
        f.write("\n")
