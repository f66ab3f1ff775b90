"""Memory requests of the torch stages (SLURM ``mem_mb``), derived from what drives the peak.

The peak resident memory of ``wsiscan infer`` (and of mining, which runs the same dense loop) is
one batch's, whatever the slide's size (:func:`wsiscan.infer.iter_dense_tiles`), so it follows
from the geometry, the network's width, the batch size and the loader, not from the slide:

* a fixed part: the interpreter with torch, OpenSlide and HDF5 loaded (``BASE_MB``; on a GPU node
  also the CUDA context and its libraries, ``CUDA_BASE_MB``) and the model's weights;
* on a CPU, the activations of one batch: the first convolution stage works at the block's full
  resolution with ``c0 = round(64 * width)`` channels and dominates; at its peak the normalised
  input (3 channels), a convolution's output and the next layer's (``c0`` each) and oneDNN's
  working copies (its blocked layout of the channels-first input and output, ``2 * c0``) are
  alive: ``(4 * c0 + 3) * block_side^2 * bytes`` per block;
* the loader's blocks in flight (uint8 RGB): ``workers * prefetch_factor`` batches read ahead
  plus the one being converted, and the tiles of a batch (float32, ``alpha`` folds included).

On a GPU the activations live on the device; the host holds the fixed part, the loader's
batches and a pinned copy of the tiles. The sum is multiplied by ``MARGIN`` and rounded up to
100 MB. ``benchmarks/bench_scale.py`` measures the peaks this is checked against (the test in
``tests/test_memory.py`` reads them from ``benchmarks/results/latest.json``).

Training holds a batch of patches with the activations kept for the backward pass
(:func:`train_memory_mb`). Resources never make Snakemake re-run a job, so a changed request
only changes what the next submissions ask for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: interpreter + torch + OpenSlide + h5py + the stage's own code, resident (measured ~0.5 GB)
BASE_MB = 800
#: what CUDA adds on the host: the context, cuDNN/cuBLAS mapped and touched, pinned pools
CUDA_BASE_MB = 3000
#: factor over the estimate: allocator slack and fragmentation
MARGIN = 1.25
#: torch's DataLoader default: batches each reading process prepares ahead
LOADER_PREFETCH = 2
#: full-resolution maps of c0 channels a training step keeps per patch (see train_memory_mb)
TRAIN_MAPS = 14
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_MB = 1e6


def _round_up(mb: float) -> int:
    return int(math.ceil(mb / 100.0) * 100)


def _dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}") from None


def _first_channels(width: float) -> int:
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width}")
    return max(1, int(round(64 * width)))


def _vgg16_weights_mb(width: float) -> float:
    """VGG16's convolution weights (float32) at ``width`` (the head is small beside them)."""
    stages = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    c_in, params = 3, 0
    for channels, convs in stages:
        c = max(1, int(round(channels * width)))
        for _ in range(convs):
            params += 9 * c_in * c
            c_in = c
    return params * 4 / _MB


def infer_memory_mb(
    *,
    block_side_px: int,
    tile_side_px: int,
    width: float,
    batch_size: int,
    workers: int,
    dtype: str = "float32",
    dense_mode: str = "single",
    device: str = "cpu",
    prefetch_factor: int = LOADER_PREFETCH,
) -> int:
    """Memory (MB, 10^6 bytes) to ask for a dense-inference job (``infer``, ``mine_negatives``).

    ``block_side_px``/``tile_side_px``: the geometry's block (input) and tile (output) sides;
    ``width``: the network's channel multiplier; ``batch_size``: blocks per device batch;
    ``workers``: block-reading processes; ``dtype``: of the activations (``float32``, or
    ``bfloat16``/``float16`` with mixed precision); ``dense_mode``: ``single`` or ``shift``
    (alpha^2 passes over ROIs of about the block's side: the same peak); ``device``: ``cpu``, or
    anything else for a GPU (``auto`` jobs are GPU jobs on SLURM). Bounded below by
    ``BASE_MB * MARGIN``; grows with every input.
    """
    if min(block_side_px, tile_side_px, batch_size) < 1 or workers < 0:
        raise ValueError("block/tile sides and batch size must be >= 1, workers >= 0")
    if dense_mode not in ("single", "shift"):
        raise ValueError(f"dense_mode must be single or shift, got {dense_mode!r}")
    px = block_side_px**2
    loader_mb = (workers * prefetch_factor + 1) * batch_size * px * 3 / _MB
    tiles_mb = 2 * batch_size * tile_side_px**2 * 4 / _MB
    fixed_mb = BASE_MB + 2 * _vgg16_weights_mb(width)
    if device == "cpu":
        c0 = _first_channels(width)
        act_mb = batch_size * (4 * c0 + 3) * px * _dtype_bytes(dtype) / _MB
    else:
        _dtype_bytes(dtype)  # checked; the activations are on the device
        fixed_mb += CUDA_BASE_MB
        act_mb = 0.0
    return _round_up(MARGIN * (fixed_mb + act_mb + loader_mb + tiles_mb))


def train_memory_mb(
    *,
    patch_side_px: int,
    width: float,
    batch_size: int,
    workers: int,
    prefetch_factor: int,
    device: str = "cpu",
) -> int:
    """Memory (MB) to ask for a training round.

    On a CPU: the activations of a batch kept for the backward pass (VGG16's convolution outputs
    sum to ~4.2 full-resolution maps of ``c0 = 64 * width`` channels; with the BatchNorm and
    ReLU outputs kept and the gradients of one layer alive, ``TRAIN_MAPS`` of them), the weights
    with their gradients and AdamW's two moments (4x), and the loader's patch batches. On a GPU
    the CUDA context instead of the activations.
    """
    if min(patch_side_px, batch_size) < 1 or workers < 0 or prefetch_factor < 1:
        raise ValueError("patch side, batch size and prefetch factor must be >= 1, workers >= 0")
    px = patch_side_px**2
    fixed_mb = BASE_MB + 4 * _vgg16_weights_mb(width)
    loader_mb = (max(workers, 1) * prefetch_factor + 1) * batch_size * px * 3 / _MB
    if device == "cpu":
        act_mb = batch_size * TRAIN_MAPS * _first_channels(width) * px * 4 / _MB
    else:
        fixed_mb += CUDA_BASE_MB
        act_mb = 0.0
    return _round_up(MARGIN * (fixed_mb + act_mb + loader_mb))


def _geometry(config: Mapping[str, Any]):
    from .geometry import Geometry

    scan = config["scan"]
    return Geometry.for_arch(scan["arch"], n=int(scan["n"]), alpha=int(scan["alpha"]))


def stage_memory_mb(config: Mapping[str, Any], stage: str) -> int:
    """The first attempt's request of rule ``stage`` (``infer``, ``mine_negatives`` or
    ``train_round``) from a validated config; the rules multiply it by the attempt.

    The width is ``model.width`` (with ``model.checkpoint`` set, the config's width stands for
    the checkpoint's: its default 1.0, the full network, is the largest request).
    """
    geo = _geometry(config)
    width = float(config["model"]["width"])
    if stage in ("infer", "mine_negatives"):
        part = config["infer"] if stage == "infer" else config["train"]["mine"]
        device = config["infer"]["device"] if stage == "infer" else config["train"]["device"]
        amp = bool(part["amp"]) and device != "cpu"
        return infer_memory_mb(
            block_side_px=geo.block_side,
            tile_side_px=geo.tile_side,
            width=width,
            batch_size=int(part["batch_size"]),
            workers=int(part["workers"]),
            dtype="bfloat16" if amp else "float32",
            dense_mode=str(part["dense_mode"]),
            device=str(device),
        )
    if stage == "train_round":
        train = config["train"]
        return train_memory_mb(
            patch_side_px=geo.Lf,
            width=width,
            batch_size=int(train["batch_size"]),
            workers=int(train["workers"]),
            prefetch_factor=int(train["prefetch_factor"]),
            device=str(train["device"]),
        )
    raise ValueError(f"no memory model for stage {stage!r}")
