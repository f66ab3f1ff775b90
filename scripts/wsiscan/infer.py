"""The ``infer`` stage: dense ScanNet tiles for every ROI block of a slide (``tiles.h5``).

Producers and consumer: a :class:`torch.utils.data.DataLoader` whose worker processes read the
blocks from the slide (each worker opens the slide itself) while the device computes the dense
tiles of the previous batch. Blocks travel as uint8 (pinned memory on CUDA) and are normalised on
the device by :func:`wsiscan.model.to_tensor`. :func:`iter_dense_tiles` is that loop; the stage
writes what it yields into ``tiles.h5`` (:mod:`wsiscan.formats.tiles`), and hard-negative mining
(:mod:`wsiscan.mining`) consumes the same loop.

Stain normalisation: a model trained on stain-normalised slides keeps its reference stain
(:mod:`wsiscan.stain`); each slide is then fitted once and every block is mapped to the reference
as it is read, in the loader workers (a per-pixel map: the blocks equal the normalised patches).

Exactness: in float32 (``amp`` false, the default) the tiles equal the patch classifier at stride
``Sd`` up to float32 rounding; TF32 is switched off for the run on CUDA. ``amp`` runs the network
under autocast (bfloat16 where the GPU supports it, else float16) and is faster but not exact.
Same inputs and settings give the same ``tiles.h5`` (cuDNN in deterministic mode).

Measured on one H100 (full width, 2884 px blocks, alpha 2, single pass, per block): float32
0.18 s, bf16 (``amp``) 0.036 s. In exact float32 mode cuDNN may take most of the free GPU memory
as workspace (65 GiB seen on an idle 80 GB card; it falls back to other algorithms when memory is
short); bf16 needs ~4 GiB per block. Full width on a CPU needs ~7 GB per 2884 px block.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .dense import dense_tiles
from .errors import ConfigError, SlideError
from .fileio import OutputWriteError, sha256_file
from .formats.rois import RoiGrid, read_rois
from .formats.tiles import write_tiles
from .geometry import Geometry
from .model import ScanNet, to_tensor
from .params import InferParams
from .slide import Slide, open_slide

log = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Blocks of a slide as RGB uint8 ``(B, B, 3)`` tensors, read at level 0 on demand.

    The slide is opened lazily in each process that reads (DataLoader workers included), so the
    dataset pickles and forks cleanly. A read error does not raise inside the worker (where it
    would lose its type); it comes back as the item's ``error`` text and the consumer raises
    :class:`SlideError`. ``stain``: a :class:`wsiscan.stain.StainMap` applied to every block.
    """

    def __init__(
        self,
        slide_path: str | Path,
        level0_xy: np.ndarray,
        block_side: int,
        *,
        slide_id: str,
        stain: Any = None,
    ) -> None:
        self.slide_path = str(slide_path)
        self.level0_xy = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
        self.block_side = int(block_side)
        self.slide_id = slide_id
        self.stain = stain
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.level0_xy.shape[0])

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, self.slide_id)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = (int(v) for v in self.level0_xy[index])
        side = self.block_side
        try:
            rgb = self._open().read_rgb((x, y), 0, (side, side))
            if self.stain is not None:
                rgb = self.stain(rgb)
            error = ""
        except SlideError as exc:
            rgb = np.zeros((side, side, 3), np.uint8)
            error = f"block {index}: {exc.cause}"  # the cause names the region (level0_xy)
        return {"index": index, "rgb": torch.from_numpy(rgb), "error": error}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None


# -- devices ---------------------------------------------------------------------------------------
def resolve_device(device: str, key: str = "infer.device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a device that is not there is a
    :class:`ConfigError` naming the config ``key``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key}: {device!r} is not a device (auto, cpu, cuda, cuda:N)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: {device!r} is not supported (auto, cpu, cuda, cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {device!r} requested but CUDA is not available here")
    return dev


@contextlib.contextmanager
def exact_cuda_math(enabled: bool) -> Iterator[None]:
    """Deterministic cuDNN and no TF32 for the duration (CUDA float32 exactness); restores flags."""
    if not enabled:
        yield
        return
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    # in a log file: a line per ~10% of the blocks (and one at the end), so `tail` shows progress
    steps = {} if tty else {"mininterval": 0.0, "miniters": max(1, math.ceil(total / 10))}
    return tqdm(
        total=total,
        desc=desc,
        unit="block",
        file=sys.stderr,
        dynamic_ncols=tty,
        **({"mininterval": 0.5} | steps),
    )


# -- the parts of the stage ------------------------------------------------------------------------
def check_slide_fits(slide_path: str | Path, grid: RoiGrid, rois: str | Path) -> None:
    """:class:`SlideError` unless ``slide_path`` has the size the ROI grid was made for."""
    with open_slide(slide_path, grid.slide_id) as slide:
        wh = slide.dimensions
    if tuple(wh) != tuple(grid.slide_wh):
        raise SlideError(
            grid.slide_id,
            rois,
            f"ROI grid was made for a {grid.slide_wh[0]}x{grid.slide_wh[1]} slide, "
            f"but {slide_path} is {wh[0]}x{wh[1]}",
        )


def load_scan_model(
    model_path: str | Path, geometry: Geometry, device: torch.device
) -> tuple[ScanNet, dict[str, Any]]:
    """The checkpoint's network on ``device`` (eval mode) and its ``tiles.h5`` attributes; a
    :class:`CheckpointError` when it cannot scan ``geometry`` (another architecture or layers).

    The network is the checkpoint's own (its width, BatchNorm); ``model.width`` configures only
    the networks that ``init_model`` and ``train_round`` build."""
    from .formats.checkpoint import load_checkpoint
    from .model import check_scans

    model, _ = load_checkpoint(model_path, map_location=device)
    check_scans(model, geometry, model_path)
    attrs = {
        "model_checksum": sha256_file(model_path),
        "model_arch": model.arch,
        "model_width": float(model.width),
        "model_batchnorm": bool(model.batchnorm),
    }
    return model, attrs


@dataclass
class ScanTiming:
    """Seconds of one scan: waiting for block reads, computing (device time included)."""

    wait_s: float = 0.0
    compute_s: float = 0.0
    #: process start to the first batch of blocks in the consumer: wall and CPU seconds
    first_batch_s: float | None = None
    first_batch_cpu_s: float | None = None


def process_seconds() -> tuple[float | None, float]:
    """``(wall, CPU)`` seconds since this process started. The wall time is Linux's (process
    start time in ``/proc/self/stat``; None elsewhere); both include the first interpreter of the
    allocator restart (:func:`wsiscan.cli.main` re-executes the same process)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_s, cpu
    except (OSError, ValueError, IndexError, AttributeError):
        return None, cpu


def dense_batch(
    model: ScanNet, rgb: torch.Tensor, alpha: int, device: torch.device, dense_mode: str
) -> torch.Tensor:
    """Dense tiles ``(k, T, T)`` float32 (on ``device``) of one batch of uint8 blocks
    ``(k, B, B, 3)``.

    Only the tiles outlive the call: the normalised input and every activation are freed before
    it returns. The input stays channels-first: oneDNN's channels-last convolutions on the CPU
    are faster and smaller (measured at width 1/8, 2884 px blocks, batch 4: live peak 4.5 ->
    2.4 GB, 1.9x) but their float32 rounding depends on the number of threads and on the batch
    size (1 ulp on some cells), run-time settings that must not change a map.
    """
    x = to_tensor(rgb, device=device)
    prob = dense_tiles(model, x, alpha, mode=dense_mode)
    del x
    # the tumour channel is a view of the softmax's (k, 2, T, T): keep a copy of it alone
    return prob.to(torch.float32).clone(memory_format=torch.contiguous_format)


def iter_dense_tiles(
    model: ScanNet,
    slide_path: str | Path,
    grid: RoiGrid,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    amp: bool,
    dense_mode: str,
    timing: ScanTiming | None = None,
    config_keys: tuple[str, str] = ("infer.batch_size", "infer.workers"),
    stain: Any = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Dense tiles of every block of ``grid``, in order: yields ``(first block index, float32
    tiles (k, T, T))`` per batch.

    ``workers`` DataLoader processes read blocks while the device computes; on CUDA the copy of
    batch ``k`` back to the host overlaps the kernels of batch ``k+1``. A block that cannot be
    read raises :class:`SlideError` naming the region; an error of a reading process (shared
    memory exhausted, say) is one line too, naming ``config_keys`` (batch size, workers).

    Memory (CPU): nothing of batch ``k`` is alive while batch ``k+1`` is computed, so every
    batch lays its activations out in the heap the same way and the process's peak is that of
    one batch, whatever the slide's size. With the torch stages' allocator settings
    (:data:`wsiscan.allocator.MALLOC_TUNING`: nothing is returned to the kernel) any buffer that
    outlives a batch (the previous batch's input, its tiles held for the next iteration) sits in
    the middle of the freed activations and pushes the next batch's above it: the heap then grew
    with the slide. A consumer should drop each batch's tiles before asking for the next, and
    allocate what it keeps in another thread (glibc gives each thread a malloc arena of its own):
    :func:`infer` writes the tiles from a writer thread. The small allocations a batch makes
    still land among its freed activations here and there, so glibc's peak varies from run to
    run by up to one activation; on jemalloc (:mod:`wsiscan.allocator`), which keeps large
    allocations apart from small ones, it is the same in every run.

    ``stain``: the slide's stain map (the model's reference), applied to every block as it is
    read.
    """
    from .faults import worker_batches

    timing = timing or ScanTiming()
    n_blocks = grid.n_blocks
    dataset = BlockDataset(
        slide_path, grid.level0_xy, grid.geometry.block_side, slide_id=grid.slide_id, stain=stain
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers if n_blocks else 0,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers and n_blocks else None,
    )

    def finish(item: tuple[int, torch.Tensor, Any]) -> tuple[int, np.ndarray]:
        start, host, event = item
        t0 = time.perf_counter()
        event.synchronize()
        timing.compute_s += time.perf_counter() - t0
        return start, host.numpy()

    pending = None  # CUDA: the batch whose copy to the host is in flight
    try:
        with exact_cuda_math(device.type == "cuda" and not amp), _autocast(device, amp):
            t_wait = time.perf_counter()
            batches = worker_batches(
                loader,
                where=f"slide {grid.slide_id!r} ({slide_path})",
                batch_bytes=batch_size * grid.geometry.block_side**2 * 3,
                batch_key=config_keys[0],
                workers_key=config_keys[1],
            )
            for batch in batches:
                t0 = time.perf_counter()
                timing.wait_s += t0 - t_wait
                if timing.first_batch_cpu_s is None:
                    timing.first_batch_s, timing.first_batch_cpu_s = process_seconds()
                errors = [e for e in batch["error"] if e]
                if errors:
                    raise SlideError(grid.slide_id, slide_path, errors[0])
                first, rgb = int(batch["index"][0]), batch["rgb"]
                del batch
                prob = dense_batch(model, rgb, grid.geometry.alpha, device, dense_mode)
                del rgb
                if device.type != "cuda":
                    timing.compute_s += time.perf_counter() - t0
                    tiles = prob.numpy()
                    del prob
                    yield first, tiles
                    del tiles
                    t_wait = time.perf_counter()
                    continue
                host = torch.empty(prob.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(prob, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                del prob
                timing.compute_s += time.perf_counter() - t0
                if pending is not None:
                    yield finish(pending)
                pending = (first, host, event)
                del host, event
                t_wait = time.perf_counter()
            if pending is not None:
                yield finish(pending)
    finally:
        dataset.close()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def slide_stain(
    model_path: str | Path, slide_path: str | Path, slide_id: str
) -> tuple[Any, dict[str, Any]]:
    """The slide's stain map onto the model's reference (None when the model has none) and the
    ``tiles.h5`` attributes that record it (``stain_normalisation``, ``stain_fit_json``)."""
    import json

    from .stain import model_stain_map

    stain = model_stain_map(str(model_path), str(slide_path), slide_id)
    if stain is None:
        return None, {"stain_normalisation": "none"}
    log.info("%s: stain normalised to the model's reference (%s)", slide_id, stain.describe())
    return stain, {
        "stain_normalisation": "macenko",
        "stain_fit_json": json.dumps(stain.describe()),
    }


def _check_settings(params: InferParams, device: torch.device, slide_id: str) -> bool:
    """Whether mixed precision is used (only on CUDA; a warning otherwise)."""
    if params.amp and device.type != "cuda":
        log.warning(
            "%s: mixed precision is only used on CUDA; running float32 on %s", slide_id, device
        )
        return False
    return params.amp


# -- the stage -------------------------------------------------------------------------------------
def infer(
    slide: str | Path,
    rois: str | Path,
    model: str | Path,
    out_tiles: str | Path,
    params: InferParams,
    *,
    slide_id: str,
) -> dict[str, Any]:
    """Stage ``infer``: run the model densely over every block of ``rois`` -> ``tiles.h5``.

    Reads the grid and checks the slide against it, loads the model and checks that it scans the
    grid's geometry, streams the tiles of :func:`iter_dense_tiles` into ``tiles.h5`` (written
    atomically) and returns a summary (blocks, seconds waiting for reads, computing and writing).
    """
    t_start = time.perf_counter()
    grid = read_rois(rois, slide_id)
    check_slide_fits(slide, grid, rois)
    device = resolve_device(params.device)
    amp = _check_settings(params, device, slide_id)
    net, model_attrs = load_scan_model(model, grid.geometry, device)
    stain, stain_attrs = slide_stain(model, slide, slide_id)
    geometry = grid.geometry
    log.info(
        "%s: %d blocks of %d px -> tiles %dx%d at stride %d px (model %s width %g, %s, %s%s)",
        slide_id,
        grid.n_blocks,
        geometry.block_side,
        geometry.tile_side,
        geometry.tile_side,
        geometry.Sd,
        net.arch,
        net.width,
        params.dense_mode,
        device,
        ", amp" if amp else "",
    )
    timing = ScanTiming()
    write_s = 0.0
    provenance = {
        **model_attrs, **stain_attrs, "dense_mode": params.dense_mode, "amp": amp,
        "device": device.type,
    }  # fmt: skip
    try:
        with (
            write_tiles(out_tiles, grid, provenance, params.tile_dtype) as out,
            _progress(grid.n_blocks, slide_id) as bar,
            ThreadPoolExecutor(1, thread_name_prefix="tiles-writer") as writer,
        ):
            for start, tiles in iter_dense_tiles(
                net,
                slide,
                grid,
                batch_size=params.batch_size,
                workers=params.workers,
                device=device,
                amp=amp,
                dense_mode=params.dense_mode,
                timing=timing,
                stain=stain,
            ):
                t0 = time.perf_counter()
                # in a thread of its own, so in a malloc arena of its own: what HDF5 and zlib
                # allocate per write (and HDF5 keeps) never lands among the freed activations
                writer.submit(out.write, start, tiles).result()
                write_s += time.perf_counter() - t0
                bar.update(len(tiles))
                del tiles  # not alive while the next batch is computed (iter_dense_tiles)
    except OutputWriteError as exc:  # disk full, file too large, I/O error
        text = str(exc).strip()
        raise SlideError(
            slide_id,
            out_tiles,
            "cannot write the tiles file (nothing was written): "
            + (text.splitlines()[0] if text else type(exc).__name__),
        ) from exc
    wall_s = time.perf_counter() - t_start
    summary = {
        "slide_id": slide_id,
        "blocks": grid.n_blocks,
        "tile_side": geometry.tile_side,
        "device": str(device),
        "amp": amp,
        "dense_mode": params.dense_mode,
        "model_checksum": model_attrs["model_checksum"],
        "wall_s": round(wall_s, 3),
        "wait_read_s": round(timing.wait_s, 3),
        "compute_s": round(timing.compute_s, 3),
        "write_s": round(write_s, 3),
        "blocks_per_s": round(grid.n_blocks / wall_s, 3) if wall_s > 0 else 0.0,
        "first_batch_s": _rounded(timing.first_batch_s),
        "first_batch_cpu_s": _rounded(timing.first_batch_cpu_s),
    }
    if timing.first_batch_cpu_s is not None:
        log.info(
            "%s: first batch of blocks %s s after the process started (%.2f s of CPU)",
            slide_id,
            "?" if timing.first_batch_s is None else f"{timing.first_batch_s:.2f}",
            timing.first_batch_cpu_s,
        )
    log.info(
        "%s: wrote %s (%d tiles) in %.1f s (waiting for reads %.1f s, compute %.1f s, write %.1f s)",
        slide_id,
        out_tiles,
        grid.n_blocks,
        wall_s,
        timing.wait_s,
        timing.compute_s,
        write_s,
    )
    return summary
