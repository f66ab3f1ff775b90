"""Inference at cohort scale (issue 18): peak RSS of ``wsiscan infer`` against the slide's size,
its start-up time, and the memory request's prediction against the measured peaks.

Each size runs under both allocators the command can choose (:mod:`wsiscan.allocator`): glibc's
malloc with the stage's settings, and jemalloc where it is installed (the command's choice then).
Each run is the command the rule runs (``python -m wsiscan infer``, which restarts itself with
the allocator settings), in a fresh child forked from a small launcher and reaped with
``os.wait4``: the figure is that process tree's own peak RSS (the largest of the stage's process
and its loader worker; ``ru_maxrss`` is a maximum, not a sum).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_pipeline import _RSS_LAUNCHER, _mask_and_grid
from .common import cache_dir, figure, load_average, round_sig
from .synthetic import CAMELYON_MPP, cached_slide

#: slide sizes (px at 0.243 um/px, 30% tissue): 8, 15, 30 and 69 blocks at n = 82
SIZES = [(8000, 7000), (12000, 10000), (20000, 16000), (32000, 28000)]
SMOKE_SIZES = [(1400, 1200)]  # one run: the harness works (flatness needs the full run)
#: runs per size: where the freed activations of the first batch land varies from run to run (by
#: up to one activation buffer), so each size is measured twice and the goal holds for all runs
REPEATS = 2
RSS_FLAT_GOAL = 1.1

_FIRST = re.compile(r"first batch of blocks ([0-9.?]+) s after the process started \(([0-9.]+) s")
_ALLOCATOR = re.compile(r"allocator: (.*)")


def allocators() -> dict[str, str]:
    """``$WSISCAN_JEMALLOC`` of each allocator to measure: glibc's malloc (``"0"``), and jemalloc
    if :func:`wsiscan.allocator.find_jemalloc` finds it (then the command's own choice)."""
    from wsiscan.allocator import JEMALLOC_ENV, find_jemalloc

    found = find_jemalloc({k: v for k, v in os.environ.items() if k != JEMALLOC_ENV})
    return {"glibc": "0"} | ({"jemalloc": found} if found else {})


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh child of a small launcher, without the allocator variables (the
    command chooses them when it restarts itself): its peak RSS (MiB), user/system/wall seconds
    and stderr."""
    from wsiscan.allocator import RESTART_VARIABLES

    env = {k: v for k, v in (env or os.environ).items() if k not in RESTART_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="wsiscan-rss-") as tmp:
        usage_json = Path(tmp) / "usage.json"
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_LAUNCHER, str(usage_json), *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        if proc.returncode != 0 or not usage_json.exists():
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        usage = json.loads(usage_json.read_text())
    return {
        "peak_rss_mib": usage["maxrss_kib"] / 1024,
        "user_s": usage["user_s"],
        "sys_s": usage["sys_s"],
        "wall_s": usage["wall_s"],
        "stderr": proc.stderr,
    }


def infer_command(slide: Path, folder: Path, model: Path, workers: int, batch: int) -> list[str]:
    """``python -m wsiscan infer`` on ``slide`` with ``folder/rois.h5``, as the rule runs it."""
    return [
        *(sys.executable, "-m", "wsiscan", "infer", "--slide", str(slide), "--slide-id", "bench"),
        *("--rois", str(folder / "rois.h5"), "--model", str(model)),
        *("--out-tiles", str(folder / "tiles.h5"), "--workers", str(workers)),
        *("--batch-size", str(batch), "--device", "cpu"),
    ]


def first_batch_s(stderr: str) -> tuple[float | None, float | None]:
    """The infer log's ``first batch of blocks`` wall and CPU seconds since the process started."""
    m = _FIRST.search(stderr)
    if not m:
        return None, None
    wall = None if m.group(1) == "?" else float(m.group(1))
    return wall, float(m.group(2))


def torch_import_s(repeats: int, warmup: int = 1) -> list[tuple[float, float]]:
    """``(wall, CPU)`` seconds of a fresh interpreter that imports torch (after ``warmup`` runs
    that warm the page cache)."""
    import resource

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    out = []
    for _ in range(repeats + warmup):
        t0, c0 = time.perf_counter(), cpu()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        out.append((time.perf_counter() - t0, cpu() - c0))
    return out[warmup:]


def bench_infer_rss(smoke: bool) -> dict[str, Any]:
    """Peak RSS and CPU time of ``wsiscan infer`` on four slide sizes, ``REPEATS`` runs each per
    allocator (slim model, n = 82, one loader worker, batch 4), the start-up time to the first
    batch, and the memory request."""
    from wsiscan.allocator import JEMALLOC_ENV
    from wsiscan.memory import infer_memory_mb
    from wsiscan.model import init_model
    from wsiscan.params import InitModelParams

    n, width, workers, batch = (4, 0.125, 1, 4) if smoke else (82, 0.125, 1, 4)
    cache = cache_dir(smoke)
    torch_s = torch_import_s(1, warmup=0) if smoke else torch_import_s(3)
    kinds = allocators()
    default = "jemalloc" if "jemalloc" in kinds else "glibc"  # what the command chooses here
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model.pt"
        init_model(model, InitModelParams(width=width, seed=0))
        for w, h in SMOKE_SIZES if smoke else SIZES:
            info = cached_slide(
                cache / f"scale_{w}x{h}.tif",
                width_px=w,
                height_px=h,
                mpp=CAMELYON_MPP,
                tissue_fraction=0.3,
                seed=1,
                pool_region_px=1024,
            )
            folder = tmp / f"{w}x{h}"
            folder.mkdir()
            setup = _mask_and_grid(Path(info["path"]), folder, n=n, alpha=2, slide_id="bench")
            import h5py

            with h5py.File(folder / "rois.h5") as f:
                block, tile = int(f.attrs["block_side"]), int(f.attrs["tile_side"])
            cmd = infer_command(Path(info["path"]), folder, model, workers, batch)
            blocks = setup["blocks"]
            for repeat in range(1 if smoke else REPEATS):
                for kind, library in kinds.items():
                    (folder / "tiles.h5").unlink(missing_ok=True)
                    res = run_child(cmd, {**os.environ, JEMALLOC_ENV: library})
                    stderr = res.pop("stderr")
                    wall0, cpu0 = first_batch_s(stderr)
                    used = _ALLOCATOR.search(stderr)
                    runs.append(
                        {
                            "slide_px": [w, h],
                            "allocator": kind,
                            "allocator_log": used.group(1) if used else None,
                            "repeat": repeat,
                            "blocks": blocks,
                            "block_side_px": block,
                            "tile_side_px": tile,
                            **{k: round_sig(v) for k, v in res.items()},
                            "cpu_s_per_block": round_sig((res["user_s"] + res["sys_s"]) / blocks),
                            "first_batch_s": wall0,
                            "first_batch_cpu_s": cpu0,
                        }
                    )
    peaks = [r["peak_rss_mib"] for r in runs]
    mine = [r for r in runs if r["allocator"] == default]
    mine_peaks = [r["peak_rss_mib"] for r in mine]
    by_size: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        by_size.setdefault((r["allocator"], r["blocks"]), []).append(r["peak_rss_mib"])
    predicted_mb = infer_memory_mb(
        block_side_px=runs[0]["block_side_px"],
        tile_side_px=runs[0]["tile_side_px"],
        width=width,
        batch_size=batch,
        workers=workers,
    )
    peak_mb = max(peaks) * 2**20 / 1e6
    torch_wall = sorted(w for w, _ in torch_s)[len(torch_s) // 2]
    torch_cpu = sorted(c for _, c in torch_s)[len(torch_s) // 2]
    starts = [r["first_batch_s"] for r in mine if r["first_batch_s"] is not None]
    start = min(starts) if starts else float("nan")
    start_cpu = min(r["first_batch_cpu_s"] for r in mine)
    largest = max(r["blocks"] for r in runs)
    figures = [
        figure(f"peak_rss_{k}_{b}_blocks_mib", max(p), f"MiB (largest of {len(p)}: {sorted(p)})")
        for (k, b), p in by_size.items()
    ]
    figures.append(
        figure(
            "peak_rss_max_over_min",
            max(mine_peaks) / min(mine_peaks),
            f"x ({default}: the command's allocator here)",
            f"<= {RSS_FLAT_GOAL}",
        )
    )
    for kind in kinds:
        at = [r for r in runs if r["allocator"] == kind]
        top = [r for r in at if r["blocks"] == largest]
        p = [r["peak_rss_mib"] for r in at]
        figures += [
            figure(f"peak_rss_max_over_min_{kind}", max(p) / min(p), "x"),
            figure(
                f"sys_s_largest_{kind}",
                max(r["sys_s"] for r in top),
                f"s system ({largest} blocks)",
            ),
            figure(
                f"cpu_s_per_block_largest_{kind}",
                min(r["cpu_s_per_block"] for r in top),
                "s CPU per block (fastest run)",
            ),
        ]
    figures += [
        figure("memory_request_mb", predicted_mb, "MB (wsiscan.memory.infer_memory_mb)"),
        figure("request_over_peak", predicted_mb / peak_mb, "x", ">= 1"),
        figure("torch_import_cpu_s", torch_cpu, "s CPU (fresh interpreter, import torch)"),
        figure("start_to_first_batch_cpu_s", start_cpu, "s CPU (process start to first batch)"),
        figure("start_minus_torch_import_cpu_s", start_cpu - torch_cpu, "s CPU", "<= 1"),
        figure("torch_import_s", torch_wall, "s wall"),
        figure("start_to_first_batch_s", start, "s wall"),
    ]
    return {
        "figures": figures,
        "runs": runs,
        "measured_peaks": [
            {
                "block_side_px": r["block_side_px"],
                "tile_side_px": r["tile_side_px"],
                "width": width,
                "batch_size": batch,
                "workers": workers,
                "dtype": "float32",
                "dense_mode": "single",
                "device": "cpu",
                "blocks": r["blocks"],
                "allocator": r["allocator"],
                "peak_rss_mb": round(r["peak_rss_mib"] * 2**20 / 1e6, 1),
            }
            for r in runs
        ],
        "torch_import_s": [[round_sig(w), round_sig(c)] for w, c in torch_s],
        "allocators": kinds,
        "n": n,
        "load_average_after": load_average(),
    }


BENCHMARKS = {"infer_rss": bench_infer_rss}
