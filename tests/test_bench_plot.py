"""The benchmark's chart (convrnn_kernels/bench/plot.py): any results JSON, synthetic or
committed, draws to a PNG; the benchmark writes one beside its JSON unless told not to, and
without matplotlib it still runs and says in one line that it wrote none."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, import_ck

import_ck()
from convrnn_kernels.bench import __main__ as bench  # noqa: E402
from convrnn_kernels.bench import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                     reason="matplotlib is not installed")


def _png_size(path):
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _row(op, label, fmt, dtype, device, direction, speedup, flops=None, check="ok"):
    ours_ms = 2.0
    row = dict(op=op, label=label, shape="s", params={}, format=fmt, dtype=dtype, device=device,
               direction=direction, check=check, ours_ms=ours_ms, torch_ms=ours_ms * speedup if speedup else None,
               speedup=speedup, bytes=4e7, gbps=4e7 / (ours_ms * 1e-3) / 1e9, flops=flops,
               gflops=flops / (ours_ms * 1e-3) / 1e9 if flops else None)
    if check != "ok":
        row.update(ours_ms=None, torch_ms=None, speedup=None, gbps=None, gflops=None)
    return row


def synthetic_results():
    """Two devices, three dtypes, both directions, rows with and without FLOPs, format-less
    rows, and rows that were not timed."""
    rows = []
    for device, dtypes in (("cpu", ("float32",)), ("cuda", ("float32", "float16", "bfloat16"))):
        for dtype in dtypes:
            for direction, k in (("forward", 1.0), ("forward+backward", 0.7)):
                for fmt in ("nchw", "channels_last"):
                    rows.append(_row("max_pool2d", "VGG 2x2/2", fmt, dtype, device, direction, 3.0 * k))
                    rows.append(_row("conv2d", "ResNet 3x3", fmt, dtype, device, direction, 0.8 * k, flops=4e9))
                    rows.append(_row("conv2d", "LeNet-5 C1", fmt, dtype, device, direction, 1.1 * k, flops=1.5e7))
                rows.append(_row("lstm_cell", "batched step", "-", dtype, device, direction, 0.9 * k))
    rows.append(_row("conv2d", "depthwise 3x3", "nchw", "float32", "cpu", "forward", None, check="FAIL"))
    meta = dict(date="2026-11-26T00:00:00+00:00", torch="2.14.1", git_commit="abc1234", threads=2, quick=True,
                devices={"cpu": "Some CPU", "cuda": "Some GPU"}, roofline_gbps={"cpu": 15.0, "cuda": 4000.0},
                compute_peak_gflops={"cpu/float32": {"gflops": 300.0, "what": "matmul"},
                                     "cuda/float32": {"gflops": 50000.0, "what": "matmul"},
                                     "cuda/float16": {"gflops": 750000.0, "what": "matmul"},
                                     "cuda/bfloat16": {"gflops": 800000.0, "what": "matmul"}})
    return {"meta": meta, "results": rows, "summary": []}


@needs_matplotlib
def test_chart_of_synthetic_results(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic_results()))
    assert plot.main([str(path), "-o", str(tmp_path / "chart.png")]) == 0
    width, height = _png_size(tmp_path / "chart.png")
    assert width > 1000 and height > 500
    assert os.path.getsize(tmp_path / "chart.png") > 20_000
    assert "chart.png" in capsys.readouterr().out


COMMITTED = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))


@needs_matplotlib
@pytest.mark.parametrize("path", COMMITTED, ids=os.path.basename)
def test_chart_of_committed_results(path, tmp_path):
    """Every committed run draws, older JSON layouts (no compute peaks, no tf32) included."""
    out = plot.write_chart(plot.load(path), str(tmp_path / "chart.png"))
    assert _png_size(out)[0] > 1000


def test_chart_path_is_the_json_stem():
    assert plot.chart_path("a/b/2026-11-26-run.json") == "a/b/2026-11-26-run.png"
    assert plot.chart_path("results") == "results.png"


def test_bench_imports_no_matplotlib():
    """matplotlib loads only when a chart is drawn (the benchmark must run without it)."""
    code = ("import sys, convrnn_kernels.bench.__main__, convrnn_kernels.bench.plot; "
            "sys.exit('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "importing the benchmark imported matplotlib"


def test_no_chart_without_matplotlib(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic_results()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    line = plot.chart_or_reason(str(path))
    assert line.startswith("no chart written") and "matplotlib" in line and "\n" not in line
    assert not (tmp_path / "results.png").exists()


# The smallest real benchmark run: one op, one format, one direction, short measurements.
TINY = ["--ops", "max_pool2d", "--quick", "--seconds", "0.02", "--devices", "cpu", "--formats", "nchw",
        "--directions", "forward", "--no-progress"]


@needs_matplotlib
def test_bench_writes_chart_beside_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert bench.main(TINY + ["--out", str(out)]) == 0
    assert out.exists()
    assert _png_size(tmp_path / "run.png")[0] > 500
    assert f"wrote {tmp_path / 'run.png'}" in capsys.readouterr().out


def test_bench_no_chart_option(tmp_path):
    out = tmp_path / "run.json"
    assert bench.main(TINY + ["--out", str(out), "--no-chart"]) == 0
    assert out.exists() and not (tmp_path / "run.png").exists()
