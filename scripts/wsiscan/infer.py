"""The ``infer`` stage: dense ScanNet tiles for every ROI block of a slide (``tiles.h5``).

Producers and consumer: a :class:`torch.utils.data.DataLoader` whose worker processes read the
blocks from the slide (each worker opens the slide itself) while the device computes the dense
tiles of the previous batch. Blocks travel as uint8 (pinned memory on CUDA) and are normalised on
the device by :func:`wsiscan.model.to_tensor`.

Exactness: in float32 (``amp=False``, the default) the tiles equal the patch classifier at stride
``Sd`` up to float32 rounding; TF32 is switched off for the run on CUDA. ``amp=True`` runs the
network under autocast (bfloat16 where the GPU supports it, else float16) and is faster but not
exact. Same inputs and settings give the same ``tiles.h5`` (cuDNN in deterministic mode).

``tiles.h5``: dataset ``tiles`` (N, T, T) tumour probability (``T = tile_side``, dtype from the
config), ``grid_xy`` (N, 2) int64 (bx, by), ``level0_xy`` (N, 2) int64 block top-left,
``tissue_fraction`` (N,); attributes: those of ``rois.h5`` plus ``model_checksum`` (sha256 of the
model file), ``model_width``, ``model_batchnorm``, ``dense_mode``, ``amp``, ``device``,
``tile_dtype``, ``wsiscan_version``. Tile ``k``, cell ``(r, c)`` is map cell
``(by*T + r, bx*T + c)`` of the slide map at stride ``Sd``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .dense import DENSE_MODES, dense_tiles
from .errors import ConfigError, SlideError
from .faults import OutputWriteError, atomic_h5
from .geometry import Geometry
from .model import to_tensor
from .slide import Slide, check_slide_id, open_slide

log = logging.getLogger(__name__)

TILE_DTYPES = ("float32", "float16")


class BlockDataset(Dataset):
    """Blocks of a slide as RGB uint8 ``(B, B, 3)`` tensors, read at level 0 on demand.

    The slide is opened lazily in each process that reads (DataLoader workers included), so the
    dataset pickles and forks cleanly. A read error does not raise inside the worker (where it
    would lose its type); it comes back as the item's ``error`` text and the consumer raises
    :class:`SlideError`.
    """

    def __init__(
        self,
        slide_path: str | Path,
        level0_xy: np.ndarray,
        block_side: int,
        *,
        slide_id: str,
        mpp_fallback: float | None = None,
    ) -> None:
        self.slide_path = str(slide_path)
        self.level0_xy = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
        self.block_side = int(block_side)
        self.slide_id = slide_id
        self.mpp_fallback = mpp_fallback
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.level0_xy.shape[0])

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, self.slide_id, self.mpp_fallback)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = (int(v) for v in self.level0_xy[index])
        side = self.block_side
        try:
            rgb = self._open().read_rgb((x, y), 0, (side, side))
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


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"infer.device: {device!r} is not a device (auto, cpu, cuda, cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"infer.device: {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"infer.device: {device!r} is not supported (auto, cpu, cuda, cuda:N)")
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


def infer_slide(
    slide_path: str | Path,
    rois_h5: str | Path,
    model_path: str | Path,
    out_h5: str | Path,
    *,
    slide_id: str,
    batch_size: int = 4,
    num_workers: int = 2,
    device: str = "auto",
    amp: bool = False,
    tile_dtype: str = "float32",
    dense_mode: str = "single",
    mpp_fallback: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the model densely over every block of ``rois_h5`` and write ``tiles.h5``.

    ``batch_size`` blocks per device batch (full width on CPU needs ~7 GB per 2884 px block:
    use 1 there); ``num_workers`` slide-reading processes (0 reads in this process);
    ``device`` ``auto``/``cpu``/``cuda[:N]``; ``amp`` autocast on CUDA (not exact; ignored on
    CPU); ``tile_dtype`` ``float32`` or ``float16``; ``dense_mode`` ``single`` or ``shift``;
    ``threads`` torch CPU threads for this call (restored after). The file is written as
    ``<out>.tmp`` and renamed at the end. Returns a summary (blocks, seconds, time waiting for
    reads, computing and writing).

    Measured on one H100 (full width, 2884 px blocks, alpha 2, single pass, per block): float32
    0.18 s, bf16 (``amp``) 0.036 s. In exact float32 mode cuDNN may take most of the free GPU
    memory as workspace (65 GiB seen on an idle 80 GB card; it falls back to other algorithms
    when memory is short); bf16 needs ~4 GiB per block.
    """
    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        return _infer_slide(
            slide_path,
            rois_h5,
            model_path,
            out_h5,
            slide_id=slide_id,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            amp=amp,
            tile_dtype=tile_dtype,
            dense_mode=dense_mode,
            mpp_fallback=mpp_fallback,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _infer_slide(
    slide_path: str | Path,
    rois_h5: str | Path,
    model_path: str | Path,
    out_h5: str | Path,
    *,
    slide_id: str,
    batch_size: int,
    num_workers: int,
    device: str,
    amp: bool,
    tile_dtype: str,
    dense_mode: str,
    mpp_fallback: float | None,
) -> dict[str, Any]:
    from .grid import read_rois
    from .model import CheckpointError, file_checksum, load_checkpoint

    t_start = time.perf_counter()
    check_slide_id(slide_id)
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(
            f"infer: batch_size must be >= 1 and workers >= 0, got {batch_size}, {num_workers}"
        )
    if tile_dtype not in TILE_DTYPES:
        raise ConfigError(f"infer.tile_dtype must be one of {TILE_DTYPES}, got {tile_dtype!r}")
    if dense_mode not in DENSE_MODES:
        raise ConfigError(f"infer.dense_mode must be one of {DENSE_MODES}, got {dense_mode!r}")
    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        log.warning(
            "%s: mixed precision is only used on CUDA; running float32 on %s", slide_id, dev
        )
        amp = False

    arrays, attrs = read_rois(rois_h5, slide_id)
    geometry = Geometry.from_attrs(attrs)
    level0_xy, grid_xy = arrays["level0_xy"], arrays["grid_xy"]
    n_blocks = int(level0_xy.shape[0])

    with open_slide(slide_path, slide_id, mpp_fallback) as slide:
        wh, mpp = slide.dimensions, slide.mpp
    if tuple(wh) != (int(attrs["slide_width"]), int(attrs["slide_height"])):
        raise SlideError(
            slide_id,
            rois_h5,
            f"ROI grid was made for a {attrs['slide_width']}x{attrs['slide_height']} slide, "
            f"but {slide_path} is {wh[0]}x{wh[1]}",
        )
    if not np.isclose(mpp, float(attrs["mpp"]), rtol=1e-3):
        raise SlideError(
            slide_id, rois_h5, f"ROI grid mpp {attrs['mpp']} differs from the slide's mpp {mpp}"
        )

    model, config = load_checkpoint(model_path, map_location=dev)
    try:
        model_geometry = model.geometry(geometry.n, geometry.alpha)
    except ValueError as exc:
        raise CheckpointError(model_path, f"cannot scan the ROI grid's geometry: {exc}")
    if model.arch != geometry.arch or model_geometry.checksum() != geometry.checksum():
        raise CheckpointError(
            model_path,
            f"model {model.arch} (Lf={model.Lf}, Sf={model.Sf}) does not match the ROI grid of "
            f"{rois_h5} ({geometry.arch}, Lf={geometry.Lf}, Sf={geometry.Sf})",
        )
    model_sha = file_checksum(model_path)
    T = geometry.tile_side
    log.info(
        "%s: %d blocks of %d px -> tiles %dx%d at stride %d px (model %s width %g, %s, %s%s)",
        slide_id,
        n_blocks,
        geometry.block_side,
        T,
        T,
        geometry.Sd,
        model.arch,
        model.width,
        dense_mode,
        dev,
        ", amp" if amp else "",
    )

    dataset = BlockDataset(
        slide_path, level0_xy, geometry.block_side, slide_id=slide_id, mpp_fallback=mpp_fallback
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers if n_blocks else 0,
        pin_memory=dev.type == "cuda",
        prefetch_factor=2 if num_workers and n_blocks else None,
    )

    out_h5 = Path(out_h5)
    np_dtype = np.dtype(tile_dtype)
    wait_s = compute_s = write_s = 0.0
    try:
        with atomic_h5(out_h5) as (f, check_writes):  # <out>.tmp, renamed when complete
            out_attrs = dict(attrs)
            out_attrs.update(
                model_checksum=model_sha,
                model_arch=model.arch,
                model_width=float(model.width),
                model_batchnorm=bool(model.batchnorm),
                dense_mode=dense_mode,
                amp=bool(amp),
                device=dev.type,
                tile_dtype=tile_dtype,
                wsiscan_version=__version__,
            )
            for key, value in out_attrs.items():
                f.attrs[key] = value
            chunk = {"chunks": (1, T, T), "compression": "gzip", "compression_opts": 1}
            tiles = f.create_dataset(
                "tiles", shape=(n_blocks, T, T), dtype=np_dtype, **(chunk if n_blocks else {})
            )
            tiles.attrs["description"] = (
                "tumour probability; cell (r, c) = map cell (by*T+r, bx*T+c)"
            )
            f.create_dataset("grid_xy", data=grid_xy.astype(np.int64).reshape(-1, 2))
            f.create_dataset("level0_xy", data=level0_xy.astype(np.int64).reshape(-1, 2))
            f.create_dataset("tissue_fraction", data=arrays["tissue_fraction"].astype(np.float32))

            def flush(item: tuple[np.ndarray, torch.Tensor, Any]) -> None:
                """Wait for one batch's tiles (CUDA event) and write them."""
                nonlocal compute_s, write_s
                index, host, event = item
                t0 = time.perf_counter()
                if event is not None:
                    event.synchronize()
                t1 = time.perf_counter()
                tiles[index[0] : index[-1] + 1] = host.numpy().astype(np_dtype)
                check_writes()  # a failed write (disk full) stops the run here
                compute_s += t1 - t0
                write_s += time.perf_counter() - t1

            # The device works on batch k+1 while batch k is copied back and written: the
            # copy of k is queued before k+1's kernels and waited for through an event.
            pending = None
            with (
                exact_cuda_math(dev.type == "cuda" and not amp),
                _autocast(dev, amp),
                _progress(n_blocks, slide_id) as bar,
            ):
                t_wait = time.perf_counter()
                for batch in loader:
                    t0 = time.perf_counter()
                    wait_s += t0 - t_wait
                    errors = [e for e in batch["error"] if e]
                    if errors:
                        raise SlideError(slide_id, slide_path, errors[0])
                    index = batch["index"].numpy()
                    x = to_tensor(batch["rgb"], device=dev)
                    prob = dense_tiles(model, x, geometry.alpha, mode=dense_mode).float()
                    event = None
                    if dev.type == "cuda":
                        host = torch.empty(prob.shape, dtype=torch.float32, pin_memory=True)
                        host.copy_(prob, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                    else:
                        host = prob
                    compute_s += time.perf_counter() - t0
                    if pending is not None:
                        flush(pending)
                        bar.update(len(pending[0]))
                    pending = (index, host, event)
                    t_wait = time.perf_counter()
                if pending is not None:
                    flush(pending)
                    bar.update(len(pending[0]))
    except OutputWriteError as exc:  # disk full, file too large, I/O error
        text = str(exc).strip()
        raise SlideError(
            slide_id,
            out_h5,
            "cannot write the tiles file (nothing was written): "
            + (text.splitlines()[0] if text else type(exc).__name__),
        ) from exc
    finally:
        dataset.close()

    wall_s = time.perf_counter() - t_start
    summary = {
        "slide_id": slide_id,
        "blocks": n_blocks,
        "tile_side": T,
        "device": str(dev),
        "amp": bool(amp),
        "dense_mode": dense_mode,
        "model_checksum": model_sha,
        "model_config": {k: config[k] for k in ("arch", "width", "batchnorm")},
        "wall_s": round(wall_s, 3),
        "wait_read_s": round(wait_s, 3),
        "compute_s": round(compute_s, 3),
        "write_s": round(write_s, 3),
        "blocks_per_s": round(n_blocks / wall_s, 3) if wall_s > 0 else 0.0,
    }
    log.info(
        "%s: wrote %s (%d tiles) in %.1f s (waiting for reads %.1f s, compute %.1f s, write %.1f s)",
        slide_id,
        out_h5,
        n_blocks,
        wall_s,
        wait_s,
        compute_s,
        write_s,
    )
    return summary
