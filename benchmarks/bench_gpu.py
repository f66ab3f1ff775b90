"""GPU benchmarks (``python -m benchmarks.run --gpu``; ``benchmarks/gpu_check.sh`` runs them).

* ``gpu_exactness``: on the GPU in float32 (TF32 off), a slim random ScanNet: the FCN on a
  ``Lf + n*Sf`` ROI equals the patch classifier at stride ``Sf``; single pass equals
  shift-and-stitch equals the patch classifier at stride ``Sd`` for alpha = 2 and 4. The bf16
  autocast deviation is reported too (exactness holds in float32 only).
* ``gpu_slide``: the paper's network (VGG16 width 1, BatchNorm, random init) at n = 82,
  alpha = 2 on a Camelyon-size synthetic slide (100000 x 80000 px at 0.243 um/px, ~25% tissue,
  ~370 blocks) through the real stages: tissue_mask, roi_grid, then :func:`wsiscan.infer.infer` with
  parallel DataLoader workers and pinned memory, with AMP (bf16) on and off. Reports seconds per
  slide (goal <= 15 s on one H100), GPU utilisation (NVML or ``nvidia-smi`` sampled in a thread),
  peak GPU memory, the loader's read-only time, and the patch-by-patch estimate on the same GPU
  (the model's rate on batches of ``Lf`` patches, extrapolated to the slide's number of outputs).
* ``gpu_train_throughput``: training samples/s on demo slides with 0 vs N loader workers at full
  width on the GPU, where the asynchronous prefetching matters most.

``WSISCAN_GPU_BENCH_SMOKE=1`` (or ``smoke=True``) runs the same code on tiny inputs, on the CPU
when there is no GPU, in seconds; without it and without CUDA the benchmarks fail with a clear
message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import cache_dir, figure, round_sig

SLIDE_GOAL_S = 15.0
EXACT_GOAL = "<= 1e-5"
CAMELYON_MPP = 0.243
SMOKE_ENV = "WSISCAN_GPU_BENCH_SMOKE"


def is_smoke(smoke: bool) -> bool:
    """``smoke`` or the environment switch ``WSISCAN_GPU_BENCH_SMOKE=1``."""
    return smoke or os.environ.get(SMOKE_ENV, "") not in ("", "0")


def bench_device(smoke: bool) -> torch.device:
    """CUDA; the CPU only in smoke mode; otherwise a clear error."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke:
        return torch.device("cpu")
    raise RuntimeError(f"the GPU benchmarks need CUDA (set {SMOKE_ENV}=1 for a dry run on the CPU)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


# -- GPU utilisation sampling --------------------------------------------------------------------
class GpuSampler:
    """Samples GPU utilisation (%) and used memory (MiB) every ``interval_s`` in a thread.

    Uses NVML (``pynvml`` from nvidia-ml-py) when importable, else ``nvidia-smi
    --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits``; with neither (or no
    GPU) it records nothing and :meth:`summary` says so.
    """

    def __init__(self, interval_s: float = 0.1, index: int = 0) -> None:
        self.interval_s = interval_s
        self.index = index
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self.nvml_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "nvml"

            def read() -> tuple[float, float]:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return float(util.gpu), mem.used / 2**20

            read()
            return read
        except Exception as exc:  # noqa: BLE001 - no NVML library or no GPU: try nvidia-smi
            self.nvml_error = str(exc)
        smi = shutil.which("nvidia-smi")
        if smi is None or not torch.cuda.is_available():
            return None
        self.source = "nvidia-smi"
        cmd = [
            smi,
            f"--id={self.index}",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]

        def read_smi() -> tuple[float, float]:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True)
            util, mem = out.stdout.strip().splitlines()[0].split(",")
            return float(util), float(mem)

        return read_smi

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(self._read())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Mean and max utilisation (%) and max used memory (MiB) over the samples."""
        if not self.samples:
            return {"source": self.source, "samples": 0}
        util = [u for u, _ in self.samples]
        return {
            "source": self.source,
            "samples": len(self.samples),
            "util_mean_pct": round_sig(statistics.fmean(util)),
            "util_median_pct": round_sig(statistics.median(util)),
            "util_max_pct": round_sig(max(util)),
            "mem_used_max_mib": round_sig(max(m for _, m in self.samples)),
        }


# -- gpu_exactness -------------------------------------------------------------------------------
def bench_gpu_exactness(smoke: bool) -> dict[str, Any]:
    """FCN == patch classifier, single pass == shift-and-stitch == patch classifier, float32 GPU."""
    from benchmarks.bench_model import random_blocks, random_model, rel_diff
    from wsiscan.dense import patch_classifier, shift_and_stitch, single_pass
    from wsiscan.infer import exact_cuda_math

    smoke = is_smoke(smoke)
    device = bench_device(smoke)
    width, n = (1 / 32, 1) if smoke else (1 / 8, 4)
    dev = str(device)
    cases: dict[str, float] = {}
    with exact_cuda_math(device.type == "cuda"):
        model = random_model(width, device=dev, seed=5)
        with torch.no_grad():  # logits of a meaningful size, so relative differences mean something
            model.head.fc8.weight.mul_(50.0)
        geo = model.geometry(n)
        roi = random_blocks(2, geo.Lr, seed=1, device=dev)
        with torch.inference_mode():
            fcn = model(roi)
        cases["fcn_vs_patch"] = rel_diff(
            fcn, patch_classifier(model, roi, geo.Sf, output="logits", batch_size=64)
        )
        for alpha in (2, 4):
            geo = model.geometry(n, alpha)
            block = random_blocks(2, geo.block_side, seed=alpha, device=dev)
            single = single_pass(model, block, alpha, output="logits")
            shift = shift_and_stitch(model, block, alpha, output="logits")
            ref = patch_classifier(model, block, geo.Sd, output="logits", batch_size=64)
            cases[f"alpha{alpha}_single_vs_shift"] = rel_diff(single, shift)
            cases[f"alpha{alpha}_single_vs_patch"] = rel_diff(single, ref)
            cases[f"alpha{alpha}_shift_vs_patch"] = rel_diff(shift, ref)
    geo = model.geometry(n, 2)
    block = random_blocks(2, geo.block_side, seed=9, device=dev)
    exact = single_pass(model, block, 2)
    with _autocast(device, True):
        fast = single_pass(model, block, 2)
    bf16_abs = float((fast.float() - exact.float()).abs().max())
    worst = max(cases.values())
    return {
        "figures": [
            figure(
                "fp32_max_rel_diff", worst, f"relative ({device.type}, width {width:g})", EXACT_GOAL
            ),
            figure("fcn_vs_patch_rel", cases["fcn_vs_patch"], "relative", EXACT_GOAL),
            figure(
                "alpha2_single_vs_shift_rel",
                cases["alpha2_single_vs_shift"],
                "relative",
                EXACT_GOAL,
            ),
            figure(
                "alpha4_single_vs_shift_rel",
                cases["alpha4_single_vs_shift"],
                "relative",
                EXACT_GOAL,
            ),
            figure("bf16_prob_max_abs_diff", bf16_abs, "probability (AMP, not exact)"),
        ],
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "width": width,
        "n": n,
        "cases": {k: float(f"{v:.3g}") for k, v in cases.items()},
        "logit_scale": round_sig(float(fcn.abs().max())),
        "tf32": "off (wsiscan.infer.exact_cuda_math)",
    }


# -- gpu_slide -----------------------------------------------------------------------------------
def patch_rate(
    model: torch.nn.Module,
    device: torch.device,
    amp: bool,
    *,
    batch: int,
    batches: int,
    patch_px: int,
) -> float:
    """Patches per second of the model on batches of ``patch_px`` patches (random input, no I/O).

    The patch classifier's best case: patches already on the device, one forward per batch.
    """
    from wsiscan.infer import exact_cuda_math

    x = torch.randn(batch, 3, patch_px, patch_px, device=device)
    with (
        exact_cuda_math(device.type == "cuda" and not amp),
        _autocast(device, amp),
        torch.inference_mode(),
    ):
        for _ in range(2):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        _sync(device)
    return batch * batches / (time.perf_counter() - t0)


def _read_only_s(slide_path: Path, rois_h5: Path, batch_size: int, workers: int) -> float:
    """Seconds to iterate the infer DataLoader (same settings as the infer stage) over every
    block."""
    from benchmarks.bench_pipeline import _block_loader
    from wsiscan.formats.rois import read_rois
    from wsiscan.infer import BlockDataset

    grid = read_rois(rois_h5, "bench")
    dataset = BlockDataset(slide_path, grid.level0_xy, grid.geometry.block_side, slide_id="bench")
    loader = _block_loader(dataset, batch_size, workers, pin_memory=torch.cuda.is_available())
    t0 = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - t0
    dataset.close()
    return seconds


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30


def bench_gpu_slide(smoke: bool) -> dict[str, Any]:
    """Seconds per Camelyon-size slide through the infer stage, AMP on and off, on one GPU."""
    from benchmarks.bench_pipeline import _mask_and_grid
    from benchmarks.synthetic import cached_slide
    from wsiscan.formats.checkpoint import load_checkpoint
    from wsiscan.infer import infer
    from wsiscan.model import init_model
    from wsiscan.params import InferParams, InitModelParams

    smoke = is_smoke(smoke)
    device = bench_device(smoke)
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, cpus - 2)
    w, h = (1600, 1400) if smoke else (100_000, 80_000)
    n, alpha, width, batch_size = (4, 2, 1 / 32, 2) if smoke else (82, 2, 1.0, 4)
    t_write = time.perf_counter()
    slide = cached_slide(  # the same file as bench_model's gpu_model: written once per machine
        cache_dir(smoke) / f"gpu_camelyon_{w}x{h}.tif",
        width_px=w,
        height_px=h,
        mpp=CAMELYON_MPP,
        tissue_fraction=0.25,
        seed=0,
        pool_region_px=1024 if smoke else 2048,
    )
    slide_s = time.perf_counter() - t_write
    slide_path = Path(slide["path"])
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wsiscan-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        setup = _mask_and_grid(slide_path, tmp, n=n, alpha=alpha)
        setup["mask_grid_s"] = time.perf_counter() - t0
        if setup["blocks"] == 0:
            raise RuntimeError(f"no tissue blocks on {slide_path}: nothing to benchmark")
        model_path = tmp / "model.pt"
        init_model(model_path, InitModelParams(width=width, batchnorm=True, seed=0))
        if device.type == "cuda":  # CUDA context and cuDNN start-up, not part of a slide's time
            torch.zeros(1, device=device).sum().item()
        for amp in (True, False) if device.type == "cuda" else (False,):
            key = "amp_bf16" if amp else "fp32"
            with GpuSampler() as sampler, _peak_memory(device) as mem:
                t0 = time.perf_counter()
                params = InferParams(
                    batch_size=batch_size, workers=workers, device=str(device), amp=amp
                )
                summary = infer(
                    slide_path,
                    tmp / "rois.h5",
                    model_path,
                    tmp / f"tiles_{key}.h5",
                    params,
                    slide_id="bench",
                )
                wall = time.perf_counter() - t0
            runs[key] = {"wall_s": wall, "summary": summary, "gpu": sampler.summary(), **mem}
        read_s = _read_only_s(slide_path, tmp / "rois.h5", batch_size, workers)
        model, config = load_checkpoint(model_path, map_location=device)
        blocks = setup["blocks"]
        tile_side = int(runs["fp32"]["summary"]["tile_side"])
        outputs = blocks * tile_side**2
        rates = {}
        for amp in (True, False) if device.type == "cuda" else (False,):
            rates["amp_bf16" if amp else "fp32"] = patch_rate(
                model,
                device,
                amp,
                batch=8 if smoke else 256,
                batches=2 if smoke else 6,
                patch_px=model.Lf,
            )
    main = runs.get("amp_bf16", runs["fp32"])
    figures = [
        figure(
            "seconds_per_slide_amp" if "amp_bf16" in runs else "seconds_per_slide_fp32",
            main["wall_s"],
            f"s ({blocks} blocks, {device.type})",
            f"<= {SLIDE_GOAL_S:g}",
        ),
    ]
    if "amp_bf16" in runs:
        figures.append(
            figure("seconds_per_slide_fp32", runs["fp32"]["wall_s"], "s (TF32 off, exact)")
        )
    for key, run in runs.items():
        gpu = run["gpu"]
        if "util_mean_pct" in gpu:
            figures.append(figure(f"gpu_util_mean_{key}", gpu["util_mean_pct"], "%"))
        if "peak_allocated_gib" in run:
            figures.append(
                figure(f"peak_gpu_mem_{key}", run["peak_allocated_gib"], "GiB allocated")
            )
    figures.append(figure("read_only_s", read_s, f"s ({workers} loader workers)"))
    for key, rate in rates.items():
        estimate = outputs / rate
        figures.append(figure(f"patch_by_patch_estimate_{key}", estimate, f"s ({outputs} patches)"))
        figures.append(
            figure(f"fcn_speedup_vs_patch_{key}", estimate / runs[key]["wall_s"], "x (whole stage)")
        )
    return {
        "figures": figures,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "slide": slide,
        "slide_ready_s": round_sig(slide_s),
        "setup": {k: round_sig(v) if isinstance(v, float) else v for k, v in setup.items()},
        "model": {
            "width": width,
            "batchnorm": True,
            "n": n,
            "alpha": alpha,
            "batch_size": batch_size,
        },
        "workers": workers,
        "runs": {
            k: {kk: round_sig(vv) if isinstance(vv, float) else vv for kk, vv in v.items()}
            for k, v in runs.items()
        },
        "patches_per_s": {k: round_sig(v) for k, v in rates.items()},
        "outputs": outputs,
    }


# -- gpu_train_throughput ------------------------------------------------------------------------
def bench_gpu_train_throughput(smoke: bool) -> dict[str, Any]:
    """Training samples/s, 0 vs N loader workers, full-width model with AMP on the GPU."""
    from benchmarks.bench_train import demo_slides, measure_throughput

    smoke = is_smoke(smoke)
    device = bench_device(smoke)
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, cpus - 2)
    folder = cache_dir(smoke) / "train"
    folder.mkdir(exist_ok=True)
    slides = demo_slides(folder, smoke, synth_workers=cpus)
    result = measure_throughput(
        slides,
        device=str(device),
        width=1 / 32 if smoke else 1.0,
        batch=4 if smoke else 64,
        per_epoch=8 if smoke else 1024,
        workers=workers,
        threads=1 if smoke else None,
        amp=True,
        repeats=1,
        n_samples=100 if smoke else 2000,
    )
    result["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return result


BENCHMARKS = {
    "gpu_exactness": bench_gpu_exactness,
    "gpu_slide": bench_gpu_slide,
    "gpu_train_throughput": bench_gpu_train_throughput,
}
