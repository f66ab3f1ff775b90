"""Per-slide pipeline benchmarks: mask + grid speed, the infer read/compute overlap, stitch memory.

* ``mask_grid`` (issue 3): the ``tissue_mask`` + ``roi_grid`` stages for a Camelyon-scale slide
  (100000 x 80000 px at 0.243 um/px) pinned to one CPU core with one BLAS thread. Goal: well
  under 10 s. The goal is checked on the CPU time (user + system of the process), which equals
  the wall time on an idle core and does not grow when other work competes for it; the wall time
  is reported beside it.
* ``infer_pipeline`` (issue 4): the infer stage's wall time against its two halves measured
  alone, read-only (the infer DataLoader iterated without a model) and compute-only (the model
  on blocks already in memory); and 0 against N loader workers. Goal: wall <= 1.1 x the larger.
* ``stitch_rss`` (issue 4): peak resident memory of the stitch stage (``wsiscan stitch`` in a
  fresh child process) for a 200000 x 100000 px slide at stride 16 px. Goal: <= 2 GiB.

Large slides are written once into ``benchmarks/results/tmp/`` (gitignored) by
:mod:`benchmarks.synthetic` and reused. ``smoke=True`` runs every harness on tiny inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    cache_dir,
    figure,
    interleaved_medians,
    load_average,
    one_core,
    round_sig,
)
from benchmarks.synthetic import (
    CAMELYON_MPP,
    cached_slide,
    camelyon_slide,
    infer_test_slide,
    write_tiles_h5,
)

MASK_GRID_GOAL_S = 10.0
OVERLAP_GOAL = 1.1
STITCH_RSS_GOAL_MIB = 2048.0


def _mask_and_grid(
    slide: Path, out: Path, n: int, alpha: int, slide_id: str = "bench"
) -> dict[str, Any]:
    """The two stages as the rules run them (``out/tissue.png``, ``out/rois.h5``), each timed."""
    from wsiscan.grid import roi_grid
    from wsiscan.params import RoiGridParams, TissueMaskParams
    from wsiscan.tissue import tissue_mask

    t0, c0 = time.perf_counter(), time.process_time()
    mask = tissue_mask(
        slide, out / "tissue.png", out / "qc" / "tissue.png", TissueMaskParams(), slide_id=slide_id
    )
    t1, c1 = time.perf_counter(), time.process_time()
    grid = roi_grid(
        slide, out / "tissue.png", out / "rois.h5", RoiGridParams(n=n, alpha=alpha),
        slide_id=slide_id,
    )  # fmt: skip
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "mask_s": t1 - t0,
        "grid_s": t2 - t1,
        "mask_cpu_s": c1 - c0,
        "grid_cpu_s": c2 - c1,
        "blocks": grid["n_blocks"],
        "grid_shape": list(grid["grid_shape"]),
        "tissue_fraction": mask["tissue_fraction"],
        "mask_level": mask["level"],
        "mask_mpp": mask["mask_mpp"],
    }


# -- mask_grid -----------------------------------------------------------------------------------
def bench_mask_grid(smoke: bool) -> dict[str, Any]:
    """Tissue mask + ROI grid of a Camelyon-scale slide on one core (median of 3 after warm-up)."""
    slide = camelyon_slide(cache_dir(smoke), smoke)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp, one_core() as core:
        load_before = load_average()
        for _ in range(1 if smoke else 4):  # the first run warms the page cache, not counted
            runs.append(_mask_and_grid(Path(slide["path"]), Path(tmp), n=82, alpha=2))
    timed = runs[1:] if len(runs) > 1 else runs

    def med(*keys: str) -> float:
        return float(np.median([sum(r[k] for k in keys) for r in timed]))

    last = runs[-1]
    return {
        "figures": [
            figure(
                "mask_plus_grid_cpu_s",
                med("mask_cpu_s", "grid_cpu_s"),
                "s CPU time, pinned to 1 core",
                f"<= {MASK_GRID_GOAL_S:g}",
            ),
            figure("mask_plus_grid_wall_s", med("mask_s", "grid_s"), "s wall, 1 core"),
            figure("mask_wall_s", med("mask_s"), "s wall, 1 core"),
            figure("grid_wall_s", med("grid_s"), "s wall, 1 core"),
            figure(
                "blocks",
                last["blocks"],
                f"blocks (n=82, alpha=2), {slide['width_px']}x{slide['height_px']} px",
            ),
            figure("tissue_fraction", last["tissue_fraction"], "of the slide"),
        ],
        "slide": slide,
        "core": core,
        "runs": [
            {k: round_sig(v) if isinstance(v, float) else v for k, v in r.items()} for r in runs
        ],
        "cold_run_s": round_sig(runs[0]["mask_s"] + runs[0]["grid_s"]),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


# -- infer_pipeline ------------------------------------------------------------------------------
def _block_loader(dataset, batch_size: int, workers: int, pin_memory: bool):
    """The DataLoader exactly as :func:`wsiscan.infer.iter_dense_tiles` builds it."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


def bench_infer_pipeline(smoke: bool) -> dict[str, Any]:
    """Infer wall time vs read-only and compute-only time; 0 vs N loader workers (CPU).

    The machine's cores are split between the producers (``N = cpus // 2`` worker processes) and
    the consumer (torch threads = the rest). The model is tiny (width 1/128, n = 10) so that on a
    CPU reading a block and computing its dense tile take comparable time, which is when the
    overlap matters most. Medians of interleaved repeats.
    """
    import h5py
    import torch

    from wsiscan.dense import dense_tiles
    from wsiscan.formats.checkpoint import load_checkpoint
    from wsiscan.formats.rois import read_rois
    from wsiscan.infer import BlockDataset, infer
    from wsiscan.model import init_model, to_tensor
    from wsiscan.params import InferParams, InitModelParams

    width, n, alpha, batch_size = 1 / 128, 10, 2, 4
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, cpus // 2)
    threads = max(1, cpus - workers)
    # 16000 x 14000 px (~780 blocks): long enough that the loader's start-up (forking a worker,
    # opening the slide: ~0.15 s before the first batch) is a small part of the stage
    slide = infer_test_slide(cache_dir(smoke), smoke, 16000, 14000)
    slide_path = Path(slide["path"])
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
            tmp = Path(tmp_name)
            setup = _mask_and_grid(slide_path, tmp, n=n, alpha=alpha)
            model_path = tmp / "model.pt"
            init_model(model_path, InitModelParams(width=width, seed=0))
            grid = read_rois(tmp / "rois.h5", "bench")
            block_side = grid.geometry.block_side
            dataset = BlockDataset(slide_path, grid.level0_xy, block_side, slide_id="bench")
            model, _ = load_checkpoint(model_path)

            def pipeline(k: int) -> dict[str, Any]:
                params = InferParams(batch_size=batch_size, workers=k, device="cpu")
                return infer(
                    slide_path,
                    tmp / "rois.h5",
                    model_path,
                    tmp / f"tiles_{k}.h5",
                    params,
                    slide_id="bench",
                )

            def read_only() -> int:
                blocks = 0
                for batch in _block_loader(dataset, batch_size, workers, pin_memory=False):
                    blocks += len(batch["index"])
                return blocks

            in_memory = [
                batch["rgb"] for batch in _block_loader(dataset, batch_size, 0, pin_memory=False)
            ]

            def compute_only() -> int:
                for rgb in in_memory:
                    dense_tiles(model, to_tensor(rgb), alpha).float().cpu().numpy()
                return len(in_memory)

            medians, all_s, results = interleaved_medians(
                {
                    "wall_workers": lambda: pipeline(workers),
                    "wall_0_workers": lambda: pipeline(0),
                    "read_only": read_only,
                    "compute_only": compute_only,
                },
                repeats=1 if smoke else 3,
            )
            dataset.close()
            with h5py.File(tmp / "tiles_0.h5") as a, h5py.File(tmp / f"tiles_{workers}.h5") as b:
                identical = bool(np.array_equal(a["tiles"][()], b["tiles"][()]))
    finally:
        torch.set_num_threads(saved_threads)
    if not identical:
        raise RuntimeError("tiles.h5 differs between 0 and N loader workers")
    blocks = setup["blocks"]
    wall, wall0 = medians["wall_workers"], medians["wall_0_workers"]
    read, compute = medians["read_only"], medians["compute_only"]
    larger = max(read, compute)
    return {
        "figures": [
            figure(f"wall_{workers}_workers_s", wall, "s"),
            figure("read_only_s", read, "s"),
            figure("compute_only_s", compute, "s"),
            figure("wall_over_max_read_compute", wall / larger, "x", f"<= {OVERLAP_GOAL:g}"),
            figure(
                "fastest_wall_over_max_read_compute",
                min(all_s["wall_workers"])
                / max(min(all_s["read_only"]), min(all_s["compute_only"])),
                "x (fastest of the repeats: less sensitive to other load)",
            ),
            figure(
                "read_wait_share",
                results["wall_workers"]["wait_read_s"] / results["wall_workers"]["wall_s"],
                "of the wall time the consumer waited for blocks",
            ),
            figure("wall_0_workers_s", wall0, "s"),
            figure(f"speedup_0_to_{workers}_workers", wall0 / wall, "x"),
            figure("ideal_speedup", (read + compute) / larger, "x (read+compute)/max"),
        ],
        "blocks": blocks,
        "block_side_px": block_side,
        "model": {"width": width, "n": n, "alpha": alpha, "batch_size": batch_size},
        "workers": workers,
        "torch_threads": threads,
        "read_ms_per_block": round_sig(1000 * read / max(1, blocks)),
        "compute_ms_per_block": round_sig(1000 * compute / max(1, blocks)),
        "stage_summary": {
            k: results["wall_workers"][k] for k in ("wall_s", "wait_read_s", "compute_s", "write_s")
        },
        "tiles_identical_0_vs_N_workers": identical,
        "times_s": all_s,
        "slide": slide,
        "load_average_after": load_average(),
    }


# -- stitch_rss ----------------------------------------------------------------------------------
# Runs argv[2:] in a child forked from this small process and writes the child's own rusage to
# argv[1]. A process created from a large one (fork or vfork) starts with the large one's memory
# counted in its ru_maxrss, which survives exec; forking from this ~10 MB launcher keeps the
# figure the measured program's own.
_RSS_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"maxrss_kib": usage.ru_maxrss, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime, "wall_s": time.perf_counter() - t0}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _child_peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh child; return (its own peak RSS in MiB, wall seconds, log tail).

    The child is forked from a small launcher process and reaped with ``os.wait4``, so the
    figure is that child's alone: neither this process's memory nor any other child's. It runs
    with glibc's default allocator settings, as every stage but the torch ones does (benchmark
    processes carry the torch stages' settings, see ``benchmarks/run.py``).
    """
    from wsiscan.allocator import MALLOC_TUNING

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNING}
    with tempfile.TemporaryDirectory(prefix="wsiscan-rss-") as tmp:
        usage_json, err_txt = Path(tmp) / "usage.json", Path(tmp) / "stderr.txt"
        t0 = time.perf_counter()
        with open(err_txt, "w") as err:
            proc = subprocess.run(
                [sys.executable, "-c", _RSS_LAUNCHER, str(usage_json), *cmd],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        wall = time.perf_counter() - t0
        text = err_txt.read_text()
        if proc.returncode != 0 or not usage_json.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
        usage = json.loads(usage_json.read_text())
    return usage["maxrss_kib"] / 1024, wall, text[-500:]


def bench_stitch_rss(smoke: bool) -> dict[str, Any]:
    """Peak RSS of ``wsiscan stitch`` (fresh child) on a 200000 x 100000 px slide, stride 16 px.

    The slide is a stand-in: the size and resolution of a large Camelyon slide, tissue on the
    reduced levels (what the mask and the heat-map thumbnail read), plain glass at levels 0-3.
    Its mask and grid (n = 82, alpha = 2: stride 16 px) come from the real stages; the tiles are
    smooth random fields written in the infer format instead of running the network.
    """
    w, h = (6000, 4000) if smoke else (200_000, 100_000)
    n, alpha = (10, 2) if smoke else (82, 2)
    slide = cached_slide(
        cache_dir(smoke) / f"standin_{w}x{h}.tif",
        width_px=w,
        height_px=h,
        mpp=CAMELYON_MPP,
        tissue_fraction=0.3,
        seed=2,
        blank_below_level=0 if smoke else 4,
        pool_region_px=1024 if smoke else 2048,
    )
    slide_path = Path(slide["path"])
    with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
        tmp = Path(tmp_name)
        setup = _mask_and_grid(slide_path, tmp, n=n, alpha=alpha)
        tiles = write_tiles_h5(tmp / "tiles.h5", tmp / "rois.h5", slide_id="bench", seed=0)
        cmd = [
            sys.executable,
            "-m",
            "wsiscan",
            "stitch",
            "--tiles",
            str(tmp / "tiles.h5"),
            "--mask",
            str(tmp / "tissue.png"),
            "--slide",
            str(slide_path),
            "--slide-id",
            "bench",
            "--out-probmap",
            str(tmp / "probmap.h5"),
            "--out-qc",
            str(tmp / "qc" / "heatmap.png"),
        ]
        rss_mib, wall_s, log_tail = _child_peak_rss(cmd)
        import h5py

        with h5py.File(tmp / "probmap.h5") as f:
            map_shape = tuple(int(v) for v in f["prob"].shape)
            stride = int(f.attrs["stride_px"])
    full_map_mib = map_shape[0] * map_shape[1] * 4 / 2**20
    return {
        "figures": [
            figure("stitch_peak_rss_mib", rss_mib, "MiB", f"<= {STITCH_RSS_GOAL_MIB:g}"),
            figure("stitch_s", wall_s, "s"),
            figure("map_cells", map_shape[0] * map_shape[1], f"cells at stride {stride} px"),
            figure("float32_map_mib", full_map_mib, "MiB (the map held whole, for scale)"),
        ],
        "slide": slide,
        "blocks": setup["blocks"],
        "map_shape": list(map_shape),
        "tiles_h5": tiles,
        "command": " ".join(cmd[1:]),
        "stderr_tail": log_tail,
    }


BENCHMARKS = {
    "mask_grid": bench_mask_grid,
    "infer_pipeline": bench_infer_pipeline,
    "stitch_rss": bench_stitch_rss,
}
