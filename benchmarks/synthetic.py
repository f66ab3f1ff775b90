"""Fast Camelyon-scale test slides for the benchmarks (seconds, not minutes, for 100000 x 80000 px).

The demo generator (:mod:`wsiscan.synth`) renders every pixel (~7 Mpx/s per core: ~20 core-minutes
for a 100000 x 80000 slide). The benchmarks need such slides on a machine whose time is counted
(the GPU check), so this writer renders a small pool of H&E-like 256 px tiles once with
:class:`wsiscan.synth.SlideRenderer`, JPEG-encodes them once, and lays them out on a tile-resolution
tissue layout (a few irregular tissue pieces covering ``tissue_fraction`` of the slide):

* level 0: the pre-encoded JPEG tiles are written as they are (no encoding at all);
* reduced levels: mosaics of the pool tiles block-averaged by ``2^k``, JPEG-encoded in parallel
  threads (``workers``; libjpeg releases the GIL); all-background tiles reuse one encoded tile.

The file has the layout the demo slides have (one page per level, 256 px JPEG tiles, YCbCr 4:2:0,
resolution tags in centimetres so OpenSlide reports mpp), so OpenSlide reads it like a scanner's
pyramidal TIFF. Tissue borders follow the 256 px tile grid (62 um at 0.243 um/px).

:func:`write_tiles_h5` writes a ``tiles.h5`` in the format of :mod:`wsiscan.infer` with smooth
random tiles, for benchmarking the stitch stage without running inference.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import imagecodecs
import numpy as np
from scipy import ndimage as ndi

from wsiscan import synth
from wsiscan.fileio import atomic_write

TILE_PX = synth.TILE_PX
JPEG_QUALITY = synth.JPEG_QUALITY
JPEG_SUBSAMPLING = synth.JPEG_SUBSAMPLING
BACKGROUND_RGB = (241, 240, 243)
MAX_LEVEL = 8  # a level-k tile is a mosaic of 2^k x 2^k pool tiles of 256 >> k px (k <= 8)

T = TypeVar("T")
R = TypeVar("R")


def encode_jpeg(tile: np.ndarray) -> bytes:
    """One ``256 x 256`` RGB tile as JPEG (YCbCr 4:2:0), as the demo slides store them."""
    return imagecodecs.jpeg8_encode(
        np.ascontiguousarray(tile),
        level=JPEG_QUALITY,
        colorspace="RGB",
        outcolorspace="YCBCR",
        subsampling=JPEG_SUBSAMPLING,
    )


def ordered_parallel(
    fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` threads, results in order, at most ``ahead`` pending."""
    workers = max(1, int(workers))
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tile_pool(mpp: float, seed: int = 0, region_px: int = 2048) -> np.ndarray:
    """H&E-like tissue tiles ``(P, 256, 256, 3)`` uint8 rendered by the demo generator at ``mpp``.

    A ``region_px`` square is rendered around the deepest point of a planned tissue piece and cut
    into 256 px tiles; tiles that are at least 95% tissue are kept (at least 4).
    """
    plan = synth.plan_slide("benchpool", "normal", seed, 6000, 5000, mpp, size_jitter=0.0)
    r, c = np.unravel_index(int(np.argmax(plan.sd_um)), plan.sd_um.shape)
    cx, cy = (c + 0.5) * plan.cell_px, (r + 0.5) * plan.cell_px
    x0 = int(np.clip(cx - region_px / 2, 0, plan.width_px - region_px))
    y0 = int(np.clip(cy - region_px / 2, 0, plan.height_px - region_px))
    rgb = synth.SlideRenderer(plan).render((x0, y0), (region_px, region_px))
    n = region_px // TILE_PX
    tiles = (
        rgb[: n * TILE_PX, : n * TILE_PX]
        .reshape(n, TILE_PX, n, TILE_PX, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(n * n, TILE_PX, TILE_PX, 3)
    )
    spread = tiles.max(axis=-1).astype(np.int16) - tiles.min(axis=-1)
    tissue = (spread > 25).mean(axis=(1, 2))
    keep = np.flatnonzero(tissue >= 0.95)
    if len(keep) < 4:
        keep = np.argsort(tissue)[-4:]
    return np.ascontiguousarray(tiles[keep])


def background_tile(seed: int = 0) -> np.ndarray:
    """Glass: ``BACKGROUND_RGB`` with slight noise, ``(256, 256, 3)`` uint8."""
    rng = np.random.default_rng([seed, 1])
    noise = rng.normal(0.0, 1.2, (TILE_PX, TILE_PX, 1))
    return np.clip(np.asarray(BACKGROUND_RGB) + noise, 0, 255).astype(np.uint8)


def tissue_layout(
    shape: tuple[int, int], tissue_fraction: float, seed: int = 0, pieces: int = 3
) -> np.ndarray:
    """Boolean ``shape`` (rows, cols of 256 px tiles): ``pieces`` irregular tissue sections.

    Elliptical pieces with smooth noisy borders, thresholded so that ``tissue_fraction`` of the
    cells are tissue.
    """
    if not 0 < tissue_fraction < 1:
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction}")
    rows, cols = shape
    rng = np.random.default_rng([seed, 2])
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    field = np.full(shape, -np.inf)
    for k in range(pieces):
        cx = (k + 0.5) / pieces * cols + rng.uniform(-0.08, 0.08) * cols
        cy = rng.uniform(0.35, 0.65) * rows
        a = rng.uniform(0.55, 0.8) * cols / pieces / 2
        b = rng.uniform(0.2, 0.3) * rows
        t = rng.uniform(-0.4, 0.4)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        field = np.maximum(field, 1.0 - u * u - v * v)
    sigma = max(1.0, min(rows, cols) / 25)
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    field += 0.6 * noise / max(float(noise.std()), 1e-9)
    # keep tissue off the slide border, as on a real slide: a smooth fall-off over the outer 12%
    edge = np.minimum.reduce([yy, xx, rows - 1 - yy, cols - 1 - xx]) / min(rows, cols)
    field -= 4.0 * np.clip((0.12 - edge) / 0.12, 0.0, 1.0) ** 2
    field[edge < 0.02] = -np.inf
    return field > np.quantile(field, 1.0 - tissue_fraction)


def _block_mean(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Average ``(P, S, S, 3)`` tiles over ``factor x factor`` blocks (rounded), uint8."""
    p, s = tiles.shape[0], tiles.shape[1] // factor
    blocks = tiles.reshape(p, s, factor, s, factor, 3).astype(np.float32)
    return (blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)


def write_fast_slide(
    path: str | Path,
    width_px: int,
    height_px: int,
    mpp: float,
    *,
    tissue_fraction: float = 0.25,
    seed: int = 0,
    workers: int | None = None,
    blank_below_level: int = 0,
    pool_region_px: int = 2048,
) -> dict[str, Any]:
    """Write a pyramidal tiled JPEG TIFF of ``width_px x height_px`` at ``mpp`` um/px.

    ``blank_below_level`` = k writes levels ``< k`` as plain glass (a stand-in slide whose low
    levels carry the content and whose level 0 only has the right size). ``workers`` threads
    encode the reduced levels (default: all CPUs this process may use); ``pool_region_px`` is the
    side of the region rendered for the tile pool (smaller is faster). Written atomically.
    Returns ``{"path", "width_px", "height_px", "mpp", "levels", "tissue_fraction", "bytes",
    "write_s"}``.
    """
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or len(os.sched_getaffinity(0))
    sizes = synth.pyramid_level_sizes(width_px, height_px)
    if len(sizes) - 1 > MAX_LEVEL:
        raise ValueError(f"{width_px}x{height_px} needs more than {MAX_LEVEL + 1} levels")
    rows0, cols0 = -(-height_px // TILE_PX), -(-width_px // TILE_PX)
    layout = tissue_layout((rows0, cols0), tissue_fraction, seed)
    pool = tile_pool(mpp, seed, pool_region_px)
    n_pool = len(pool)
    pool = np.concatenate([pool, background_tile(seed)[None]])  # index n_pool = glass
    rng = np.random.default_rng([seed, 3])
    index = np.where(layout, rng.integers(0, n_pool, layout.shape), n_pool).astype(np.int32)
    encoded0 = [encode_jpeg(t) for t in pool]
    blank = encode_jpeg(np.full((TILE_PX, TILE_PX, 3), BACKGROUND_RGB, np.uint8))

    def level_tiles(level: int) -> Iterator[bytes]:
        w, h = sizes[level]
        rows, cols = -(-h // TILE_PX), -(-w // TILE_PX)
        if level < blank_below_level:
            for _ in range(rows * cols):
                yield blank
            return
        if level == 0:
            for i in index.ravel():
                yield encoded0[i]
            return
        f = 2**level
        sub = _block_mean(pool, f)  # (P+1, 256/f, 256/f, 3)
        padded = np.full((rows * f, cols * f), n_pool, np.int32)
        padded[: min(rows0, rows * f), : min(cols0, cols * f)] = index[: rows * f, : cols * f]
        glass_k = encode_jpeg(np.tile(sub[n_pool], (f, f, 1)))

        def encode_row(ty: int) -> list[bytes]:
            ids = padded[ty * f : (ty + 1) * f]  # (f, cols*f)
            out = []
            for tx in range(cols):
                cell = ids[:, tx * f : (tx + 1) * f]
                if (cell == n_pool).all():
                    out.append(glass_k)
                    continue
                mosaic = sub[cell].transpose(0, 2, 1, 3, 4).reshape(TILE_PX, TILE_PX, 3)
                out.append(encode_jpeg(mosaic))
            return out

        for row in ordered_parallel(encode_row, range(rows), workers):
            yield from row

    w0, h0 = sizes[0]
    with atomic_write(path) as fh:
        synth.write_pages(
            fh, sizes, level_tiles, mpp, w0 * h0 * 3 > 2**31, "wsiscan benchmark slide"
        )
    return {
        "path": str(path),
        "width_px": int(width_px),
        "height_px": int(height_px),
        "mpp": float(mpp),
        "levels": len(sizes),
        "tissue_fraction": round(float(layout.mean()), 4),
        "pool_tiles": n_pool,
        "bytes": path.stat().st_size,
        "write_s": round(time.perf_counter() - t0, 3),
    }


def cached_slide(path: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`write_fast_slide` unless ``path`` exists from an earlier run with the same arguments.

    The arguments are kept in ``<path>.json`` beside the slide; a mismatch rewrites it.
    """
    import json

    meta_path = path.with_name(path.name + ".json")
    wanted = {k: v for k, v in sorted(kwargs.items()) if k != "workers"}
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("args") == wanted:
            return {**meta["info"], "cached": True}
    info = write_fast_slide(path, **kwargs)
    meta_path.write_text(json.dumps({"args": wanted, "info": info}, indent=1))
    return {**info, "cached": False}


#: Level-0 resolution of the benchmark slides (um/px), that of Camelyon16's 40x scans.
CAMELYON_MPP = 0.243


def camelyon_slide(cache: Path, smoke: bool, prefix: str = "camelyon") -> dict[str, Any]:
    """The Camelyon-scale test slide (100000 x 80000 px, 25% tissue; 3000 x 2400 for ``smoke``),
    written once into ``cache`` and shared by every benchmark that reads it."""
    w, h = (3000, 2400) if smoke else (100_000, 80_000)
    return cached_slide(
        cache / f"{prefix}_{w}x{h}.tif",
        width_px=w,
        height_px=h,
        mpp=CAMELYON_MPP,
        tissue_fraction=0.25,
        seed=0,
        pool_region_px=1024 if smoke else 2048,
    )


def infer_test_slide(cache: Path, smoke: bool, width_px: int, height_px: int) -> dict[str, Any]:
    """A small slide for timing the infer stage on a CPU (30% tissue; 1400 x 1200 for ``smoke``)."""
    w, h = (1400, 1200) if smoke else (width_px, height_px)
    return cached_slide(
        cache / f"infer_{w}x{h}.tif",
        width_px=w,
        height_px=h,
        mpp=CAMELYON_MPP,
        tissue_fraction=0.3,
        seed=1,
        pool_region_px=1024 if smoke else 2048,
    )


def smooth_tiles(n: int, side: int, seed: int = 0, cells: int = 6) -> Iterator[np.ndarray]:
    """``n`` smooth random probability tiles ``(side, side)`` float32 in [0, 1], one at a time.

    Each is a ``cells x cells`` Gaussian field upsampled bilinearly and squashed by a steep
    logistic, so most cells are near 0 with occasional tumour-like bumps near 1.
    """
    rng = np.random.default_rng([seed, 4])
    for _ in range(n):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        field = ndi.zoom(coarse, side / cells, order=1, mode="nearest", grid_mode=True)
        yield (1.0 / (1.0 + np.exp(-4.0 * (field[:side, :side] - 1.5)))).astype(np.float32)


def write_tiles_h5(
    path: str | Path, rois_h5: str | Path, *, slide_id: str, seed: int = 0
) -> dict[str, Any]:
    """Write a ``tiles.h5`` (:mod:`wsiscan.formats.tiles`) for the blocks of ``rois_h5``, with
    :func:`smooth_tiles` in place of the network's output (no model runs).

    Tiles are written one at a time (memory does not grow with the number of blocks). Returns
    ``{"blocks", "tile_side", "bytes", "write_s"}``.
    """
    from wsiscan.formats.rois import read_rois
    from wsiscan.formats.tiles import write_tiles

    t0 = time.perf_counter()
    grid = read_rois(rois_h5, slide_id)
    n, side = grid.n_blocks, grid.geometry.tile_side
    model = {
        "model_checksum": "0" * 64,  # no model: the tiles are synthetic
        "model_arch": grid.geometry.arch,
        "model_width": 1.0,
        "model_batchnorm": True,
        "dense_mode": "single",
        "amp": False,
        "device": "cpu",
    }
    with write_tiles(path, grid, model) as out:
        for k, tile in enumerate(smooth_tiles(n, side, seed)):
            out.write(k, tile[None])
    return {
        "blocks": n,
        "tile_side": side,
        "bytes": Path(path).stat().st_size,
        "write_s": round(time.perf_counter() - t0, 3),
    }
