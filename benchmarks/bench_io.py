"""Block reading and the CPU allocator: the two per-block costs outside the network itself.

* ``block_read``: one level-0 block of the paper's geometry (2884 px: n = 82, alpha = 2) read
  through OpenSlide (``read_region``, then RGBA to RGB) against the direct JPEG tile reader
  (:mod:`wsiscan.slide`), on tissue blocks of a Camelyon-scale synthetic slide, in one process,
  interleaved repeats; both must give identical pixels. The infer loader's workers do exactly
  this per block, so the ratio is how many fewer reader processes a GPU needs.
* ``malloc``: ``wsiscan infer`` (the command the rule runs, demo model width 1/8, n = 20,
  alpha = 2) on a synthetic 8000 x 7000 px slide with glibc's default allocator settings
  (``WSISCAN_MALLOC_TUNING=0``) against the settings the command applies to itself
  (:data:`wsiscan.allocator.MALLOC_TUNING`); and one training step of the demo model (batch 32) in a
  fresh process each way. Interleaved medians; the tiles of both runs must be identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_pipeline import _mask_and_grid
from benchmarks.common import cache_dir, figure, interleaved_medians, load_average, round_sig
from benchmarks.synthetic import camelyon_slide, infer_test_slide

BLOCK_READ_GOAL = 2.0  # the direct reader must at least halve the per-block read time


def _tissue_blocks(slide, side: int, k: int, seed: int = 0) -> list[tuple[int, int]]:
    """``k`` block origins whose centre lies in tissue (a darker-than-glass 128 px probe)."""
    rng = np.random.default_rng(seed)
    w, h = slide.dimensions
    out: list[tuple[int, int]] = []
    for _ in range(100 * k):
        x, y = int(rng.integers(0, max(1, w - side))), int(rng.integers(0, max(1, h - side)))
        probe = slide.read_rgb((x + side // 2 - 64, y + side // 2 - 64), 0, (128, 128))
        if probe.mean() < 215:
            out.append((x, y))
            if len(out) == k:
                break
    if len(out) < k:
        raise RuntimeError(f"found {len(out)} tissue blocks of {k} on {slide.path}")
    return out


def bench_block_read(smoke: bool) -> dict[str, Any]:
    """Seconds per 2884 px level-0 block: OpenSlide vs the direct JPEG tile reader."""
    from wsiscan.geometry import Geometry
    from wsiscan.slide import open_slide

    side = Geometry.for_arch("vgg16", n=10 if smoke else 82, alpha=2).block_side
    info = camelyon_slide(cache_dir(smoke), smoke)
    path = Path(info["path"])
    n_blocks = 4 if smoke else 24
    with open_slide(path, "bench") as fast, open_slide(path, "bench", direct_tiles=False) as ref:
        blocks = _tissue_blocks(ref, side, n_blocks)
        identical = all(
            np.array_equal(fast.read_rgb(xy, 0, (side, side)), ref.read_rgb(xy, 0, (side, side)))
            for xy in blocks[:4]
        )
        if not (identical and fast.reads_tiles_directly):
            raise RuntimeError("the direct reader is off or differs from OpenSlide")

        def read_all(slide) -> int:
            for xy in blocks:
                slide.read_rgb(xy, 0, (side, side))
            return len(blocks)

        medians, all_s, _ = interleaved_medians(
            {"openslide": lambda: read_all(ref), "direct": lambda: read_all(fast)},
            repeats=1 if smoke else 3,
        )
    per_os, per_direct = medians["openslide"] / n_blocks, medians["direct"] / n_blocks
    return {
        "figures": [
            figure("openslide_s_per_block", per_os, f"s ({side} px block, one process)"),
            figure("direct_s_per_block", per_direct, f"s ({side} px block, one process)"),
            figure(
                "direct_speedup", per_os / per_direct, "x (same pixels)", f">= {BLOCK_READ_GOAL:g}"
            ),
            figure("direct_mpx_per_s", side * side / per_direct / 1e6, "Mpx/s, one core"),
        ],
        "block_side_px": side,
        "blocks": n_blocks,
        "identical_pixels": identical,
        "times_s": all_s,
        "slide": info,
        "load_average_after": load_average(),
    }


_TRAIN_STEP = """
import resource, sys, time
import numpy as np, torch
from wsiscan.model import ScanNet, to_tensor
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
model = ScanNet(width=0.125, dropout=0.2).train()
opt = torch.optim.AdamW(model.parameters())
rng = np.random.default_rng(0)
x = to_tensor(rng.integers(0, 255, (32, 244, 244, 3), dtype=np.uint8))
y = torch.from_numpy(rng.integers(0, 2, 32))
def step():
    loss = torch.nn.functional.cross_entropy(model(x).flatten(1), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
t0 = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print((time.perf_counter() - t0) / int(sys.argv[2]))
"""


def bench_malloc(smoke: bool) -> dict[str, Any]:
    """``wsiscan infer`` and a training step with and without the glibc allocator settings."""
    from wsiscan.allocator import JEMALLOC_ENV, MALLOC_TUNING, NO_MALLOC_TUNING_ENV
    from wsiscan.model import init_model
    from wsiscan.params import InitModelParams

    if not sys.platform.startswith("linux"):
        raise RuntimeError("the allocator settings are glibc's (Linux)")
    info = infer_test_slide(cache_dir(smoke), smoke, 8000, 7000)
    slide = Path(info["path"])
    threads = str(max(1, len(os.sched_getaffinity(0))))
    # glibc's malloc in both arms (jemalloc, where installed, is infer_rss's comparison)
    base_env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNING} | {JEMALLOC_ENV: "0"}
    envs = {"default": base_env | {NO_MALLOC_TUNING_ENV: "0"}, "tuned": base_env}
    wsiscan = [sys.executable, "-m", "wsiscan"]
    with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
        tmp = Path(tmp_name)
        n = 4 if smoke else 20
        setup = _mask_and_grid(slide, tmp, n=n, alpha=2)
        model = tmp / "model.pt"
        init_model(model, InitModelParams(width=0.125, seed=0))

        def infer(kind: str) -> Path:
            out = tmp / f"tiles_{kind}.h5"
            subprocess.run(
                [*wsiscan, "infer", "--slide", str(slide), "--slide-id", "bench"]
                + ["--rois", str(tmp / "rois.h5"), "--model", str(model), "--out-tiles", str(out)]
                + ["--workers", "1", "--device", "cpu"],  # torch: all cores (its default)
                env=envs[kind],
                check=True,
                capture_output=True,
            )
            return out

        def train_step(kind: str) -> float:
            # a fresh interpreter started with the settings (as the tuned command restarts itself)
            env = envs[kind] | (MALLOC_TUNING if kind == "tuned" else {})
            res = subprocess.run(
                [sys.executable, "-c", _TRAIN_STEP, threads, "1" if smoke else "6"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            return float(res.stdout.strip().splitlines()[-1])

        repeats = 1 if smoke else 3
        medians, all_s, outs = interleaved_medians(
            {"default": lambda: infer("default"), "tuned": lambda: infer("tuned")}, repeats
        )
        import h5py

        with h5py.File(outs["default"]) as a, h5py.File(outs["tuned"]) as b:
            identical = bool(np.array_equal(a["tiles"][()], b["tiles"][()]))
        steps = {"default": [], "tuned": []}
        for _ in range(repeats):
            for kind in steps:
                steps[kind].append(train_step(kind))
    if not identical:
        raise RuntimeError("the tiles differ with and without the allocator settings")
    step_default, step_tuned = (float(np.median(steps[k])) for k in ("default", "tuned"))
    return {
        "figures": [
            figure("infer_default_s", medians["default"], f"s ({setup['blocks']} blocks)"),
            figure("infer_tuned_s", medians["tuned"], f"s ({setup['blocks']} blocks)"),
            figure("infer_speedup", medians["default"] / medians["tuned"], "x (same tiles)"),
            figure("train_step_default_s", step_default, "s (batch 32, width 1/8)"),
            figure("train_step_tuned_s", step_tuned, "s (batch 32, width 1/8)"),
            figure("train_step_speedup", step_default / step_tuned, "x"),
        ],
        "settings": MALLOC_TUNING,
        "blocks": setup["blocks"],
        "torch_threads": int(threads),
        "tiles_identical": identical,
        "times_s": all_s,
        "train_step_s": {k: [round_sig(v) for v in vs] for k, vs in steps.items()},
        "slide": info,
        "load_average_after": load_average(),
    }


BENCHMARKS = {"block_read": bench_block_read, "malloc": bench_malloc}
