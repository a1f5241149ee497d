"""python -m convrnn_kernels.bench: times our ops against PyTorch's on the seed's layer
shapes, on every device present, after checking that both agree.  Prints a table and a
geomean summary against the project's speed goals, writes the same to JSON with a PNG chart
beside it (plot.py), and exits non-zero when any of our results disagrees with torch's or raises."""
import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch

from . import load_cases
from .core import DIRECTIONS, DTYPES, FORMATS, Config, Rooflines, groups, run
from .plot import chart_or_reason
from .report import (Progress, compute_peaks, header, load_average, make_meta, render, results_table,
                     summarize, summary_table, write_json)


def _present_devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _choice(parser, value: Optional[str], allowed: Sequence[str], what: str) -> List[str]:
    """A comma list checked against the allowed names; None means all of them."""
    if value is None:
        return list(allowed)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"--{what}: unknown or empty {unknown or value!r}; choose from {', '.join(allowed)}")
    return chosen


def parse_args(argv):
    """The options; --ops is checked later, against the cases it selects from."""
    p = argparse.ArgumentParser(prog="python -m convrnn_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", help="comma list of ops (default all; --list shows them)")
    p.add_argument("--devices", help="comma list of devices (default all present: %s)" % ",".join(_present_devices()))
    p.add_argument("--dtypes", default="float32", help=f"comma list of {','.join(DTYPES)} (default float32)")
    p.add_argument("--formats", help="comma list of nchw,channels_last (default both)")
    p.add_argument("--directions", help="comma list of forward,forward+backward (default both)")
    p.add_argument("--quick", action="store_true", help="batch / 4 and short measurements: a smoke run")
    p.add_argument("--seconds", type=float, help="measurement time per row (default 1, 0.15 with --quick)")
    p.add_argument("--tf32", choices=("off", "on"), default="off",
                   help="TF32 for float32 matrix work on CUDA, on both sides (torch.backends.cudnn.allow_tf32 "
                        "and cuda.matmul.allow_tf32; default off)")
    p.add_argument("--out", default="bench-results.json", help="JSON file to write (default %(default)s)")
    p.add_argument("--no-chart", action="store_true",
                   help="no PNG chart beside the JSON (default: one with the same stem, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = p.parse_args(argv)
    args.devices = _choice(p, args.devices, _present_devices(), "devices")
    args.dtypes = _choice(p, args.dtypes, list(DTYPES), "dtypes")
    args.formats = _choice(p, args.formats, FORMATS, "formats")
    args.directions = _choice(p, args.directions, DIRECTIONS, "directions")
    return p, args


def _list(cases, cfg: Config):
    todo = [dict(op=c.op, layer=c.label, shape=c.shape, format=f or "-", dtype=dt, device=d)
            for c, d, dt, f in groups(cases, cfg)]
    print(render([(k, lambda r, k=k: r[k]) for k in ("op", "layer", "shape", "format", "dtype", "device")], todo))
    print(f"{len(todo)} cases x {len(cfg.directions)} directions ({', '.join(cfg.directions)})")


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    all_cases = load_cases(args.quick)
    ops = _choice(parser, args.ops, list(dict.fromkeys(c.op for c in all_cases)), "ops")
    cases = [c for c in all_cases if c.op in ops]
    cfg = Config(devices=args.devices, dtypes=args.dtypes, formats=args.formats,
                 directions=args.directions, quick=args.quick, seconds=args.seconds)
    if args.list:
        _list(cases, cfg)
        return 0

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    load = load_average()  # before the rooflines below add their own load
    # Rooflines first, on a quiet machine: the copy bandwidth of every device, and the matmul
    # peak only where some selected case declares its FLOPs.
    roof = Rooflines(args.quick)
    for d in cfg.devices:
        roof.copy_gbps(torch.device(d))
        if any(c.flops for c in cases):
            for dt in cfg.dtypes:
                roof.flops_gflops(torch.device(d), DTYPES[dt])
    meta = make_meta(cfg.devices, args.quick, roof, load, args.seconds)
    meta["tf32"] = args.tf32 == "on"  # both sides: cuDNN and our float32 CUDA kernels read the same flag
    print(header(meta) + ("\n" + compute_peaks(meta) if roof.compute else ""), flush=True)

    progress = Progress(len(list(groups(cases, cfg))), enabled=not args.no_progress)
    rows = run(cases, cfg, roof, progress)
    summary = summarize(rows, cases)
    print("\n" + results_table(rows))
    print("\nGeomean over shapes, against the project's goals:\n" + summary_table(summary))
    write_json(args.out, meta, rows, summary)
    print(f"\nwrote {os.path.abspath(args.out)}")
    if not args.no_chart:
        print(chart_or_reason(args.out))

    skipped = sum(r["check"] == "SKIP" for r in rows)
    if skipped:
        print(f"{skipped} rows skipped: torch itself cannot run them (see the JSON's error field)")
    bad = [r for r in rows if r["check"] in ("FAIL", "ERROR")]
    if bad:
        print(f"{len(bad)} of {len(rows)} rows disagree with torch or raised (FAIL/ERROR); not timed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
