"""The benchmark harness: every benchmark runs on tiny inputs (smoke), the GPU check script's dry
run works on a CPU, and the pieces the figures rest on (goals, synthetic slides, the stitch memory
measurement) are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from benchmarks.bench_pipeline import _child_peak_rss
from benchmarks.common import figure, goal_met
from benchmarks.run import (
    GPU_TABLE_BEGIN,
    HEAVY_SMOKE,
    TABLE_BEGIN,
    TABLE_END,
    refresh_readme,
    registry,
)
from benchmarks.synthetic import write_fast_slide, write_tiles_h5
from wsiscan.formats.rois import RoiGrid, write_rois
from wsiscan.geometry import Geometry
from wsiscan.grid import block_grid
from wsiscan.slide import open_slide

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["WSISCAN_BENCH_CACHE"] = str(tmp_path / "cache")  # fresh inputs, not the repo's cache
    env.update(extra)
    return env


def _check_report(report: dict, names: list[str]) -> None:
    assert list(report["benchmarks"]) == names
    for name, result in report["benchmarks"].items():
        assert "error" not in result, f"{name}: {result['error']}"
        assert result["figures"], name
        for fig in result["figures"]:
            assert {"name", "value", "unit"} <= set(fig), (name, fig)
            assert isinstance(fig["value"], int | float) and np.isfinite(fig["value"]), (name, fig)
            if "goal" in fig:
                assert fig["met"] == goal_met(fig["value"], fig["goal"]), (name, fig)
        assert result["seconds"] > 0 and result["peak_rss_mb"] > 0


def test_smoke_run_of_every_cpu_benchmark(tmp_path: Path) -> None:
    """``python -m benchmarks.run --smoke --no-readme``: every harness runs and reports figures."""
    readme = REPO / "benchmarks" / "README.md"
    before = readme.read_text() if readme.exists() else None
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--no-readme", "--out", str(out)],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    (report_path,) = out.glob("*-smoke.json")
    report = json.loads(report_path.read_text())
    expected = [n for n in registry() if not n.startswith("gpu") and n not in HEAVY_SMOKE]
    assert {"mask_grid", "infer_pipeline", "stitch_rss", "train_throughput"} <= set(expected)
    _check_report(report, expected)
    assert report["smoke"] is True
    infer = report["benchmarks"]["infer_pipeline"]
    assert infer["tiles_identical_0_vs_N_workers"] is True
    assert infer["blocks"] > 0
    assert report["benchmarks"]["stitch_rss"]["blocks"] > 0
    scale = {f["name"]: f for f in report["benchmarks"]["infer_rss"]["figures"]}
    assert scale["request_over_peak"]["met"], scale  # wsiscan.memory's request above the peak
    assert "| mask_grid | mask_plus_grid_cpu_s |" in proc.stdout
    assert (readme.read_text() if readme.exists() else None) == before  # --no-readme


def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh with WSISCAN_GPU_BENCH_SMOKE=1 runs the GPU benchmarks on the CPU."""
    out = tmp_path / "gpu"
    names = ["gpu_exactness", "gpu_slide"]  # gpu_train_throughput: train_throughput's code
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=_env(
            tmp_path,
            PYTHON=sys.executable,
            OUT=str(out),
            WSISCAN_GPU_BENCH_SMOKE="1",
            WSISCAN_GPU_BENCH_ONLY=",".join(names),
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (report_path,) = out.glob("*.json")
    report = json.loads(report_path.read_text())
    _check_report(report, names)
    exact = report["benchmarks"]["gpu_exactness"]
    assert exact["logit_scale"] > 0.1  # outputs large enough for the relative check to mean much
    assert all(v <= 1e-5 for v in exact["cases"].values()), exact["cases"]
    assert report["benchmarks"]["gpu_slide"]["setup"]["blocks"] > 0
    log = (out / "gpu_check.log").read_text()
    assert "wsiscan" in log and "== done (status 0)" in log


def test_run_reports_a_failing_benchmark(tmp_path: Path) -> None:
    """A benchmark that fails is recorded with its cause and the exit status says so."""
    from benchmarks.run import main

    out = tmp_path / "out"
    assert main(["--smoke", "--no-readme", "--out", str(out), "--only", "no_such_benchmark"]) == 1
    report = json.loads(next(out.glob("*.json")).read_text())
    assert "KeyError" in report["benchmarks"]["no_such_benchmark"]["error"]


def test_goals_and_figures() -> None:
    assert goal_met(9.9, "<= 10") and not goal_met(10.1, "<= 10")
    assert goal_met(30, ">= 30") and not goal_met(29.9, ">=30")
    assert goal_met(1.01, "> 1") and not goal_met(1.0, "> 1")
    with pytest.raises(ValueError):
        goal_met(1.0, "about 3")
    fig = figure("x", 1.234567, "s", "<= 1.5")
    assert fig == {"name": "x", "value": 1.235, "unit": "s", "goal": "<= 1.5", "met": True}


def test_readme_tables_keep_each_benchmarks_latest_result(tmp_path: Path) -> None:
    """A partial run (--only) or a GPU report updates its own rows and leaves the others."""
    readme, latest = tmp_path / "README.md", tmp_path / "latest.json"
    readme.write_text(f"# Benchmarks\n\n## DAG\n\nkept\n\n{TABLE_BEGIN}\nold\n{TABLE_END}\n")

    def report(date: str, benchmarks: dict, gpu: str | None = None) -> dict:
        machine = {"platform": "p", "cpus": 2} | ({"gpu": gpu} if gpu else {})
        return {"date": date, "command": "c", "machine": machine, "benchmarks": benchmarks}

    first = {"a": {"figures": [figure("f", 1.0, "s", "<= 2")]}, "b": {"error": "exit 1: boom"}}
    refresh_readme(report("2026-01-01", first), readme, latest)
    refresh_readme(report("2026-01-02", {"b": {"figures": [figure("g", 3, "x")]}}), readme, latest)
    gpu = {"gpu_slide": {"figures": [figure("s", 9.5, "s", "<= 15")]}}
    refresh_readme(report("2026-01-03", gpu, gpu="H100"), readme, latest)
    text = readme.read_text()
    assert "kept" in text and "old" not in text
    assert "| a | f | 1.0 | s | <= 2 | yes | R1 |" in text
    assert "| b | g | 3 | x |  |  | R2 |" in text and "boom" not in text
    assert "R1: 2026-01-01, `p`, 2 CPUs; `c`." in text
    cpu_table = text.split(TABLE_BEGIN)[1].split(GPU_TABLE_BEGIN)[0]
    gpu_table = text.split(GPU_TABLE_BEGIN)[1]
    assert "gpu_slide" not in cpu_table
    assert "| gpu_slide | s | 9.5 | s | <= 15 | yes | R1 |" in gpu_table and "H100" in gpu_table
    assert text.count(TABLE_BEGIN) == 1 and text.count(GPU_TABLE_BEGIN) == 1
    assert set(json.loads(latest.read_text())["benchmarks"]) == {"a", "b", "gpu_slide"}


def test_fast_slide_opens_in_openslide_with_its_size_levels_and_mpp(tmp_path: Path) -> None:
    info = write_fast_slide(
        tmp_path / "s.tif", 3001, 2203, 0.25, tissue_fraction=0.3, seed=1, pool_region_px=1024
    )
    assert abs(info["tissue_fraction"] - 0.3) < 0.05
    with open_slide(tmp_path / "s.tif", "s") as slide:
        assert slide.dimensions == (3001, 2203)
        assert slide.level_count == info["levels"] == 3
        assert slide.level_dimensions[1] == (1501, 1102)
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        top = slide.thumbnail(slide.level_count - 1).astype(int)
        level0 = slide.read_rgb((0, 0), 0, (3001, 2203)).astype(int)
    # tissue is purple-pink H&E (saturated), glass is near-white and grey
    spread0 = level0.max(-1) - level0.min(-1)
    tissue0 = spread0 > 25
    assert 0.2 < tissue0.mean() < 0.4
    assert level0[~tissue0].mean() > 230
    # the reduced level shows the same layout as level 0
    f = 4
    h, w = top.shape[0] - 1, top.shape[1] - 1  # whole 4x4 blocks of level 0
    coarse = tissue0[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3)) > 0.5
    spread_top = top[:h, :w].max(-1) - top[:h, :w].min(-1)
    assert ((spread_top > 25) == coarse).mean() > 0.9


def test_stand_in_slide_is_glass_below_the_content_level(tmp_path: Path) -> None:
    write_fast_slide(tmp_path / "s.tif", 4096, 3072, 0.25, blank_below_level=1, pool_region_px=1024)
    with open_slide(tmp_path / "s.tif", "s") as slide:
        level0 = slide.read_rgb((0, 0), 0, (4096, 3072))
        level1 = slide.thumbnail(1).astype(int)
    assert (np.abs(level0.astype(int) - (241, 240, 243)) <= 3).all()
    assert ((level1.max(-1) - level1.min(-1)) > 25).mean() > 0.1


def test_tiles_h5_in_the_infer_format_stitches(tmp_path: Path) -> None:
    """write_tiles_h5 writes what `wsiscan stitch` reads; the map holds the tiles where the
    grid convention puts them."""
    slide = tmp_path / "s.tif"
    write_fast_slide(slide, 2000, 1500, 0.5, pool_region_px=1024)
    geo = Geometry.for_arch("vgg16", 2, 2)
    mask = np.zeros((15, 20), bool)
    mask[3:9, 5:14] = True
    grid = block_grid(mask, (100.0, 100.0), (2000, 1500), geo)
    rois = RoiGrid(
        geometry=geo,
        level0_xy=grid.level0_xy,
        grid_xy=grid.grid_xy,
        tissue_fraction=grid.tissue_fraction,
        grid_shape=grid.grid_shape,
        slide_id="s",
        slide_wh=(2000, 1500),
        mpp=0.5,
        mask_level=0,
        mask_downsample_xy=(100.0, 100.0),
        min_tissue_fraction=0.0,
    )
    write_rois(tmp_path / "rois.h5", rois)
    info = write_tiles_h5(tmp_path / "tiles.h5", tmp_path / "rois.h5", slide_id="s", seed=3)
    assert info["blocks"] == grid.n_blocks > 0
    cmd = [
        sys.executable,
        "-m",
        "wsiscan",
        "stitch",
        "--tiles",
        str(tmp_path / "tiles.h5"),
        "--slide",
        str(slide),
        "--slide-id",
        "s",
        "--out-probmap",
        str(tmp_path / "probmap.h5"),
        "--out-qc",
        str(tmp_path / "heatmap.png"),
        "--no-confine-to-tissue",  # the grid comes from a hand-made mask: no tissue.png
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = geo.tile_side
    with h5py.File(tmp_path / "tiles.h5") as tf, h5py.File(tmp_path / "probmap.h5") as pf:
        tiles, grid_xy, prob = tf["tiles"][()], tf["grid_xy"][()], pf["prob"]
        assert tiles.min() >= 0 and tiles.max() <= 1 and tiles.std() > 0.01
        for k in (0, len(tiles) - 1):
            bx, by = grid_xy[k]
            placed = prob[by * t : (by + 1) * t, bx * t : (bx + 1) * t]
            np.testing.assert_allclose(placed, tiles[k][: placed.shape[0], : placed.shape[1]])


def test_child_peak_rss_is_the_childs_own(tmp_path: Path) -> None:
    """The stitch memory figure: the child's peak RSS, not this process's or an earlier child's."""
    big = [
        sys.executable,
        "-c",
        "import numpy as np; a = np.ones(400 * 2**20 // 8); print(a.sum())",
    ]
    small = [sys.executable, "-c", "pass"]
    rss_big, _, _ = _child_peak_rss(big)
    rss_small, _, _ = _child_peak_rss(small)
    assert 400 <= rss_big < 500  # the array plus Python and numpy, not this (large) process
    assert rss_small < 50  # not the earlier, larger child
    with pytest.raises(RuntimeError, match="failed"):
        _child_peak_rss([sys.executable, "-c", "raise SystemExit(3)"])
