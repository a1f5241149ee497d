"""Charts of a benchmark results JSON: `python -m convrnn_kernels.bench.plot RESULTS.json [-o OUT.png]`.
The benchmark calls `chart_or_reason` to write one beside its JSON (same stem, .png).

Panels, all drawn from the JSON alone (rows and meta), nothing estimated:
  speed-up   torch ms / ours ms of every row: one line per op x layer x memory format, log
             scale, the 1x line (right of it ours is faster).
  compute    roofline of the rows that declare a FLOP count (conv2d): x = arithmetic
             intensity, FLOPs / bytes moved (bytes as meta.bytes_formula counts them), y =
             achieved GFLOP/s, under the ceilings measured in the same run: the copy bandwidth
             (meta.roofline_gbps, slanted) and the matmul peak per dtype (meta.compute_peak_gflops).
  bandwidth  rows that declare no FLOP count (pooling, LRN, the recurrent ops): achieved GB/s
             per op against the copy bandwidth.  No FLOP count is made up for them, so an op
             whose time goes to arithmetic (a matrix product inside the op) sits far below
             the line without that line being what limits it.
The compute and bandwidth panels are drawn once per device.  One encoding throughout: colour =
device/dtype series, circle = forward, triangle = forward+backward, filled = NCHW (or no
format), hollow = channels_last.

matplotlib is imported only when a chart is drawn, and draws on its Agg canvas: no display,
no pyplot state."""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .core import DIRECTIONS, DTYPES

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf")
MARKERS = {"forward": "o", "forward+backward": "^"}
FORMAT_NAMES = {"nchw": "NCHW", "channels_last": "channels_last", "-": ""}
Series = Tuple[str, str]  # (device, dtype)


def chart_path(json_path: str) -> str:
    """Where the chart of a results file goes: same folder and stem, .png."""
    return os.path.splitext(json_path)[0] + ".png"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _timed(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r["check"] == "ok" and r.get("speedup")]


def _compute_rows(rows: Sequence[dict], device: str) -> List[dict]:
    """The compute roofline's rows: timed on `device`, with a FLOP count and bytes moved."""
    return [r for r in _timed(rows) if r["device"] == device and r.get("flops") and r.get("bytes")]


def _bandwidth_rows(rows: Sequence[dict], device: str) -> List[dict]:
    """The bandwidth panel's rows: timed on `device`, without a FLOP count."""
    return [r for r in _timed(rows) if r["device"] == device and not r.get("flops") and r.get("gbps")]


def _series(results: dict) -> List[Series]:
    """The device x dtype combinations present, devices in meta order, dtypes in DTYPES order."""
    present = {(r["device"], r["dtype"]) for r in results["results"]}
    devices = list(results["meta"].get("devices", {})) + sorted({d for d, _ in present})
    order = {d: i for i, d in enumerate(dict.fromkeys(devices))}
    dtypes = {d: i for i, d in enumerate(DTYPES)}
    return sorted(present, key=lambda s: (order[s[0]], dtypes.get(s[1], len(dtypes)), s[1]))


def _series_name(s: Series, series: Sequence[Series]) -> str:
    one_device = len({d for d, _ in series}) == 1
    return s[1] if one_device else f"{s[0]} {s[1]}"


def _style(r: dict, series: Sequence[Series]) -> dict:
    """Marker keywords of one row: colour by series, shape by direction, fill by format."""
    colour = COLOURS[series.index((r["device"], r["dtype"])) % len(COLOURS)]
    return dict(marker=MARKERS.get(r["direction"], "s"), markersize=6, linestyle="none",
                markeredgecolor=colour, markeredgewidth=1.2,
                markerfacecolor="white" if r["format"] == "channels_last" else colour)


def _plot_row(ax, x: float, y: float, r: dict, series: Sequence[Series]):
    ax.plot([x], [y], zorder=3, **_style(r, series))


# ---- speed-up ---------------------------------------------------------------------------

def _speedup_lines(rows: Sequence[dict]) -> List[Tuple[str, Optional[tuple]]]:
    """The panel's y lines, top to bottom: ("op", None) heads each op's group, then
    ("layer  format", key) per op x layer x format in the order the rows came."""
    keys = list(dict.fromkeys((r["op"], r["label"], r["format"]) for r in rows))
    lines, last_op = [], None
    for key in keys:
        if key[0] != last_op:
            lines.append((key[0], None))
            last_op = key[0]
        lines.append((f"{key[1]}  {FORMAT_NAMES.get(key[2], key[2])}".rstrip(), key))
    return lines


def _line_labels(lines, rows: Sequence[dict]) -> List[str]:
    """The y tick labels; a line with rows that were not timed says why (FAIL/ERROR/SKIP)."""
    checks: Dict[tuple, set] = {}
    for r in rows:
        if r["check"] != "ok":
            checks.setdefault((r["op"], r["label"], r["format"]), set()).add(r["check"])
    return [text + (f"  [{'/'.join(sorted(checks[key]))}]" if key in checks else "") for text, key in lines]


def speedup_panel(ax, rows: Sequence[dict], series: Sequence[Series]):
    """One line per op x layer x format, op names in bold above their group; the series of a
    line sit side by side (dodged) so that float16 and bfloat16 do not hide float32."""
    lines = _speedup_lines(rows)
    where = {key: y for y, (_, key) in enumerate(lines) if key}
    dodge = 0.6 / max(1, len(series))
    timed = _timed(rows)
    for r in timed:
        y = where[(r["op"], r["label"], r["format"])]
        y += (series.index((r["device"], r["dtype"])) - (len(series) - 1) / 2) * dodge
        _plot_row(ax, r["speedup"], y, r, series)
    ax.set_yticks(range(len(lines)), _line_labels(lines, rows), fontsize=7.5)
    for y, (tick, (_, key)) in enumerate(zip(ax.get_yticklabels(), lines)):
        if key is None:
            tick.set_fontweight("bold")
            tick.set_fontsize(9)
            if y:
                ax.axhline(y - 0.5, color="0.6", linewidth=0.8)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    _speedup_axis(ax, [r["speedup"] for r in timed])


def _speedup_axis(ax, values: List[float]):
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = min(values + [1.0]) / 1.3, max(values + [1.0]) * 1.3
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvspan(lo, 1, color="#d62728", alpha=0.06, zorder=0)
    ax.axvline(1, color="black", linewidth=1.2, zorder=2)
    ax.grid(axis="x", color="0.85", zorder=0)
    ax.tick_params(axis="x", labeltop=True, labelsize=8)
    ax.set_xlabel("speed-up over torch = torch ms / ours ms (log; left of 1x torch is faster)", fontsize=9)
    ax.set_title("Speed-up over torch per op and shape", fontsize=11)


# ---- rooflines ----------------------------------------------------------------------------

def _peaks(meta: dict, device: str) -> Dict[str, float]:
    """dtype -> matmul GFLOP/s measured on `device` (keys of compute_peak_gflops are device/dtype)."""
    out = {}
    for key, v in (meta.get("compute_peak_gflops") or {}).items():
        dev, _, dtype = key.rpartition("/")
        if dev == device:
            out[dtype] = v["gflops"]
    return out


def _colour(device: str, dtype: str, series: Sequence[Series]) -> str:
    return COLOURS[series.index((device, dtype)) % len(COLOURS)] if (device, dtype) in series else "0.4"


def _plain_log(axis):
    """Log-axis tick labels as plain numbers (100, 0.1, 2,000), not 10^2 or 6x10^0; minor
    ticks get one where matplotlib's LogFormatter would give one (short ranges)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            if not super().__call__(x, pos):
                return ""
            return f"{x:,.0f}" if x >= 1 else f"{x:g}"
    axis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def compute_panel(ax, rows: Sequence[dict], meta: dict, device: str, series: Sequence[Series]):
    """Achieved GFLOP/s against arithmetic intensity, under the measured ceilings."""
    mine = _compute_rows(rows, device)
    intensity = [r["flops"] / r["bytes"] for r in mine]
    for x, r in zip(intensity, mine):
        _plot_row(ax, x, r["gflops"], r, series)
    _name_layers(ax, mine, intensity, series)
    bw, peaks = meta.get("roofline_gbps", {}).get(device), _peaks(meta, device)
    ridges = [p / bw for p in peaks.values()] if bw else []
    lo, hi = min(intensity + ridges) / 3, max(intensity + ridges) * 3
    _ceilings(ax, lo, hi, bw, {d: (p, _colour(device, d, series)) for d, p in peaks.items()})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    _plain_log(ax.xaxis)
    _plain_log(ax.yaxis)
    ax.grid(which="major", color="0.88", zorder=0)
    ax.set_xlabel("arithmetic intensity = FLOPs / bytes moved (log)", fontsize=9)
    ax.set_ylabel("achieved GFLOP/s (log)", fontsize=9)
    ax.set_title(f"{device}: compute roofline ({', '.join(_ops(mine))}: the ops with a FLOP count)", fontsize=10)


def _ceilings(ax, lo: float, hi: float, bw: Optional[float], peaks: Dict[str, Tuple[float, str]]):
    """The copy bandwidth as the slanted line GFLOP/s = GB/s x FLOP/byte (grey: it is no
    dtype's), up to the highest ridge point, and each dtype's matmul peak flat from its own
    ridge point.  Labels of peaks close together are stacked downwards."""
    top = max([p for p, _ in peaks.values()], default=None)
    if bw:
        end = min(hi, top / bw) if top else hi
        ax.plot([lo, end], [bw * lo, bw * end], color="0.35", linewidth=1.3, zorder=2)
        ax.annotate(f"copy bandwidth {bw:,.1f} GB/s", (lo, bw * lo), xytext=(4, 8), textcoords="offset points",
                    fontsize=7.5, color="0.3")
    offset, previous = 3, None
    for dtype, (peak, colour) in sorted(peaks.items(), key=lambda kv: -kv[1][0]):
        ax.plot([max(lo, peak / bw) if bw else lo, hi], [peak, peak], color=colour, linewidth=1.3, zorder=2)
        offset = offset - 11 if previous and previous / peak < 1.5 else 3
        ax.annotate(f"{dtype} matmul peak {peak:,.0f} GFLOP/s", (max(lo, peak / bw) if bw else lo, peak),
                    xytext=(4, offset), textcoords="offset points", va="bottom", fontsize=7.5, color=colour,
                    bbox=dict(boxstyle="square,pad=0.05", facecolor="white", edgecolor="none", alpha=0.75))
        previous = peak


def _name_layers(ax, rows: Sequence[dict], intensity: Sequence[float], series: Sequence[Series]):
    """Each layer's name once, beside its forward point in the first series and format."""
    named = set()
    for x, r in sorted(zip(intensity, rows), key=lambda xr: (series.index((xr[1]["device"], xr[1]["dtype"])),
                                                               xr[1]["direction"] != "forward")):
        if (r["op"], r["label"]) not in named:
            named.add((r["op"], r["label"]))
            ax.annotate(r["label"], (x, r["gflops"]), xytext=(5, -3), textcoords="offset points", fontsize=6.5,
                        color="0.2", va="top", gid="layer-name", zorder=4,
                        bbox=dict(boxstyle="square,pad=0.05", facecolor="white", edgecolor="none", alpha=0.75),
                        arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.5, shrinkA=0, shrinkB=3))


def _declutter(fig, rounds: int = 50):
    """Moves overlapping layer names (the compute panels' annotations) down, each below the
    one above it, until none overlap: drawn once to learn where the text lands.  A name
    that moved keeps a thin line to its point."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer, points_per_pixel = fig.canvas.get_renderer(), 72.0 / fig.dpi
    for ax in fig.axes:
        names = [t for t in ax.texts if t.get_gid() == "layer-name"]
        for _ in range(rounds):
            # Text's extent: the Annotation's own would include the line to the point
            boxes = sorted(((Text.get_window_extent(t, renderer), t) for t in names), key=lambda bt: -bt[0].y1)
            moved = False
            for i, (upper, _) in enumerate(boxes):
                for lower, text in boxes[i + 1:]:
                    if lower.overlaps(upper):
                        dx, dy = text.xyann
                        text.xyann = (dx, dy - (lower.y1 - upper.y0 + 1) * points_per_pixel)
                        moved = True
                        break
                if moved:
                    break
            if not moved:
                break


def _ops(rows: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(r["op"] for r in rows))


def bandwidth_panel(ax, rows: Sequence[dict], meta: dict, device: str, series: Sequence[Series]):
    """Achieved GB/s per op (rows without a FLOP count) against the copy bandwidth."""
    mine = _bandwidth_rows(rows, device)
    ops = _ops(mine)
    for i, op in enumerate(ops):
        members = sorted((r for r in mine if r["op"] == op),
                         key=lambda r: (series.index((r["device"], r["dtype"])), DIRECTIONS.index(r["direction"])
                                        if r["direction"] in DIRECTIONS else 9))
        for j, r in enumerate(members):
            _plot_row(ax, i + (j + 0.5) / len(members) * 0.76 - 0.38, r["gbps"], r, series)
        if i:
            ax.axvline(i - 0.5, color="0.85", linewidth=0.8)
    bw = meta.get("roofline_gbps", {}).get(device)
    if bw:
        ax.axhline(bw, color="0.3", linewidth=1.3, zorder=2)
        ax.annotate(f"copy bandwidth {bw:,.1f} GB/s", (len(ops) - 0.55, bw), xytext=(0, 3),
                    textcoords="offset points", fontsize=7.5, color="0.3", va="bottom", ha="right")
    ax.set_xlabel("bytes moved: each input, output and gradient once (meta.bytes_formula);\n"
                  "ops limited by arithmetic or by per-call overhead sit far below the line", fontsize=7.5, color="0.3")
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_xlim(-0.5, len(ops) - 0.5)
    ax.set_xticks(range(len(ops)), ops, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", which="major", color="0.88", zorder=0)
    ax.set_ylabel("achieved GB/s = bytes moved / ours ms (log)", fontsize=9)
    ax.set_title(f"{device}: bandwidth of the ops without a FLOP count", fontsize=10)


# ---- the figure -----------------------------------------------------------------------------

def _legend(fig, series: Sequence[Series]):
    from matplotlib.lines import Line2D

    def proxy(label, **kw):
        style = dict(marker="o", markersize=6, linestyle="none", color="0.3", markeredgewidth=1.2)
        style.update(kw)
        return Line2D([], [], label=label, **style)
    handles = [proxy(_series_name(s, series), marker="s", color=COLOURS[i % len(COLOURS)])
               for i, s in enumerate(series)]
    handles += [proxy(d, marker=m) for d, m in MARKERS.items()]
    handles += [proxy("NCHW (or no format)"), proxy("channels_last", markerfacecolor="white"),
                proxy("measured ceiling", marker=None, linestyle="-", linewidth=1.3)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8.5, frameon=False)


def _title(results: dict) -> str:
    meta = results["meta"]
    dtypes = sorted({r["dtype"] for r in results["results"]}, key=lambda d: list(DTYPES).index(d)
                    if d in DTYPES else 99)
    devices = ", ".join(f"{d}: {name}" for d, name in meta.get("devices", {}).items())
    extras = [f"{meta['threads']} CPU threads" if "cpu" in meta.get("devices", {}) else None,
              "TF32 on" if meta.get("tf32") else None, "quick mode" if meta.get("quick") else None]
    first = f"convrnn_kernels vs torch {meta.get('torch', '?')}: {devices}; {', '.join(dtypes)}"
    second = f"{meta.get('date', '?')}, git {meta.get('git_commit', '?')}"
    return first + "\n" + ", ".join([second] + [e for e in extras if e])


def draw(results: dict):
    """The chart of one results dict (the JSON the benchmark writes) as a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, meta = results["results"], results["meta"]
    series = _series(results)
    devices = list(dict.fromkeys(d for d, _ in series))
    n_lines = len(_speedup_lines(rows))
    fig = Figure(figsize=(7.5 + 6.5 * len(devices), max(8.0, 0.19 * n_lines + 2.5)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 1 + len(devices), width_ratios=[1.15] + [1] * len(devices))
    if not _timed(rows):
        fig.text(0.5, 0.5, "no row was timed (every row FAIL/ERROR/SKIP)", ha="center")
    else:
        speedup_panel(fig.add_subplot(grid[:, 0]), rows, series)
    for col, device in enumerate(devices, start=1):
        panels = [p for p, has in ((compute_panel, _compute_rows(rows, device)),
                                   (bandwidth_panel, _bandwidth_rows(rows, device))) if has]
        for i, panel in enumerate(panels):
            panel(fig.add_subplot(grid[i, col] if len(panels) == 2 else grid[:, col]), rows, meta, device, series)
    _legend(fig, series)
    fig.suptitle(_title(results), fontsize=11)
    FigureCanvasAgg(fig)
    _declutter(fig)
    return fig


def write_chart(results: dict, out_png: str) -> str:
    """Draws the chart and writes it as a PNG; returns the path written."""
    fig = draw(results)
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def chart_or_reason(json_path: str) -> str:
    """What the benchmark prints after its JSON: the chart written beside it, or why not."""
    try:
        import matplotlib  # noqa: F401 -- only to know whether charts can be drawn
    except ImportError:
        return "no chart written: matplotlib is not installed (pip install matplotlib)"
    try:
        out = write_chart(load(json_path), chart_path(json_path))
    except Exception as exc:  # noqa: BLE001 -- the JSON is written; a chart bug must not fail the run
        return (f"no chart written: {type(exc).__name__}: {exc} "
                f"(retry: python -m convrnn_kernels.bench.plot {json_path})")
    return f"wrote {os.path.abspath(out)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convrnn_kernels.bench.plot",
                                description="Draw the chart of a benchmark results JSON as a PNG.")
    p.add_argument("results", help="a JSON written by python -m convrnn_kernels.bench")
    p.add_argument("-o", "--out", help="PNG to write (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        p.error("matplotlib is not installed (pip install matplotlib)")
    out = write_chart(load(args.results), args.out or chart_path(args.results))
    print(f"wrote {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
