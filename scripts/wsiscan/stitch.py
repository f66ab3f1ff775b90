"""The ``stitch`` stage: dense tiles into the slide-level probability map and lesion mask.

``probmap.h5``:

* ``prob`` float32 ``(ceil(H/Sd), ceil(W/Sd))``: map cell ``(i, j)`` covers level-0 pixels
  ``[j*Sd, (j+1)*Sd) x [i*Sd, (i+1)*Sd)`` and holds the tumour probability of the ``Lf`` patch
  centred on the cell centre; 0 where no block was scanned (no tissue).
* ``mask`` uint8: ``prob >= threshold`` followed by a binary opening then closing with disks of
  radius ``opening_um`` / ``closing_um`` (converted to cells by ``Sd * mpp``; 0 = off). The
  image border does not erode or dilate (``mode="ignore"``).
* attributes: ``stride_px`` (= Sd, level-0 px per cell), ``origin_level0_xy`` (0, 0), ``mpp``
  (level-0 um/px), ``slide_width``, ``slide_height``, ``slide_id``, the geometry attributes and
  ``geometry_checksum``, ``model_checksum``, ``threshold``, ``opening_um``, ``closing_um``, the
  radii in cells, ``wsiscan_version``.

Memory stays bounded by the slide *width*: tiles are placed one strip of block rows at a time
into a chunked HDF5 dataset, and the mask is computed strip by strip with a halo of rows wide
enough for the morphology (so it equals the whole-map result exactly).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import SlideError
from .faults import OutputWriteError, atomic_h5, h5_attrs, quarantine
from .geometry import Geometry
from .slide import check_slide_id

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_OPENING_UM = 8.0
DEFAULT_CLOSING_UM = 16.0
#: Target resolution of the QC thumbnail in um/px and its largest side in pixels.
QC_TARGET_MPP = 12.0
QC_MAX_SIDE = 2000
#: Probabilities below this are not drawn on the QC heat map (the tissue stays visible).
QC_MIN_PROB = 0.05
#: Minimum strip height in map rows (strips hold whole block rows).
MIN_STRIP_ROWS = 256


# -- pure functions ------------------------------------------------------------------------------
def radius_cells(radius_um: float, cell_um: float) -> int:
    """Disk radius in map cells for a radius in um (rounded; 0 switches the operation off)."""
    if radius_um < 0:
        raise ValueError(f"morphology radius must be >= 0 um, got {radius_um}")
    return int(round(radius_um / cell_um))


def clean_mask(prob: np.ndarray, threshold: float, open_r: int, close_r: int) -> np.ndarray:
    """``prob >= threshold``, then a binary opening (disk ``open_r`` cells), then a closing."""
    from skimage.morphology import closing, disk, opening

    mask = np.asarray(prob) >= threshold
    if open_r > 0:
        mask = opening(mask, disk(open_r), mode="ignore")
    if close_r > 0:
        mask = closing(mask, disk(close_r), mode="ignore")
    return mask


def mask_in_strips(
    prob, mask_out, threshold: float, open_r: int, close_r: int, strip_rows: int
) -> int:
    """Write :func:`clean_mask` of ``prob`` into ``mask_out`` (uint8) strip by strip.

    ``prob`` and ``mask_out`` are 2-D array-likes (numpy arrays or HDF5 datasets). Each strip is
    computed with a halo of ``2*(open_r + close_r)`` rows, the reach of the four morphological
    steps, so the result equals the whole-array computation. Returns the number of mask cells.
    """
    height = prob.shape[0]
    halo = 2 * (open_r + close_r)
    total = 0
    for r0 in range(0, height, strip_rows):
        r1 = min(height, r0 + strip_rows)
        a0, a1 = max(0, r0 - halo), min(height, r1 + halo)
        mask = clean_mask(prob[a0:a1], threshold, open_r, close_r)[r0 - a0 : r1 - a0]
        mask_out[r0:r1] = mask.astype(np.uint8)
        total += int(mask.sum())
    return total


# -- I/O -----------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_tiles_meta(tiles_h5: str | Path, slide_id: str) -> tuple[dict[str, Any], Geometry]:
    """Attributes and geometry of ``tiles.h5``; :class:`SlideError` naming the file when unusable."""
    tiles_h5 = Path(tiles_h5)
    if not tiles_h5.is_file():
        raise SlideError(slide_id, tiles_h5, "tiles file not found")
    try:
        with h5py.File(tiles_h5, "r") as f:
            attrs = h5_attrs(f)
            shapes = {k: f[k].shape for k in ("tiles", "grid_xy") if k in f}
    except (OSError, KeyError, RuntimeError) as exc:
        raise quarantine(tiles_h5, slide_id, "tiles file is not a readable HDF5 file", exc)
    if set(shapes) != {"tiles", "grid_xy"}:
        raise SlideError(slide_id, tiles_h5, "tiles file lacks the datasets tiles and grid_xy")
    if attrs.get("slide_id") != slide_id:
        raise SlideError(
            slide_id, tiles_h5, f"tiles file belongs to slide {attrs.get('slide_id')!r}"
        )
    missing = [
        k for k in ("slide_width", "slide_height", "mpp", "model_checksum") if k not in attrs
    ]
    if missing:
        raise SlideError(slide_id, tiles_h5, f"tiles file lacks attributes {missing}")
    try:
        geometry = Geometry.from_attrs(attrs)
    except (KeyError, ValueError) as exc:
        raise SlideError(slide_id, tiles_h5, f"tiles file geometry is invalid: {exc}")
    n, t = shapes["grid_xy"][0], geometry.tile_side
    if shapes["tiles"] != (n, t, t) or shapes["grid_xy"] != (n, 2):
        raise SlideError(
            slide_id,
            tiles_h5,
            f"tiles {shapes['tiles']} / grid_xy {shapes['grid_xy']} do not fit tile side {t}",
        )
    return attrs, geometry


def _write_png_atomic(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def slide_thumbnail(slide, target_mpp: float = QC_TARGET_MPP, max_side: int = QC_MAX_SIDE):
    """RGB uint8 thumbnail near ``target_mpp`` (finer for small slides), read in bands.

    The long side is kept between ~1000 px (when the slide allows) and ``max_side`` px.
    Returns ``(rgb, level0_px_per_thumb_px_xy)``. The nearest pyramid level is read band by band
    and block-averaged by an integer factor, so memory stays bounded on single-level slides.
    """
    from skimage.measure import block_reduce

    long_um = max(slide.dimensions) * slide.mpp
    # small slides get a sharper picture: at least ~1000 px on the long side, at most max_side
    target_mpp = max(min(target_mpp, long_um / 1000), long_um / max_side)
    level = slide.level_for_mpp(target_mpp)
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    factor = max(1, int(round(target_mpp / slide.level_mpp(level))))
    factor = max(factor, math.ceil(max(w, h) / max_side))
    band = factor * max(1, (1 << 26) // (max(w, 1) * factor))  # ~64 Mpx (256 MiB RGBA) per read
    parts = []
    for y in range(0, h, band):
        rows = min(band, h - y)
        rgb = slide.read_rgb((0, int(round(y * ds))), level, (w, rows))
        parts.append(block_reduce(rgb, (factor, factor, 1), np.mean, cval=255))
    thumb = np.concatenate(parts, axis=0).round().astype(np.uint8)
    W, H = slide.dimensions
    return thumb, (W / thumb.shape[1], H / thumb.shape[0])


def _qc_heatmap(
    png: Path,
    prob_ds,
    stride_px: int,
    slide_wh: tuple[int, int],
    slide_id: str,
    threshold: float,
    thumb: np.ndarray | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.measure import block_reduce

    rows, cols = prob_ds.shape
    factor = max(1, math.ceil(max(rows, cols) / QC_MAX_SIDE))
    step = factor * max(1, 1024 // factor)
    small = np.concatenate(
        [
            block_reduce(prob_ds[r : min(rows, r + step)], (factor, factor), np.max, cval=0.0)
            for r in range(0, rows, step)
        ],
        axis=0,
    )
    W, H = slide_wh
    cell = factor * stride_px
    extent = (0, small.shape[1] * cell, small.shape[0] * cell, 0)
    aspect = H / W
    fig_w = 9.0
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, min(fig_w * aspect, 14.0))))
    try:
        if thumb is not None:
            ax.imshow(thumb, extent=(0, W, H, 0), interpolation="bilinear")
        else:
            ax.set_facecolor("white")
        overlay = np.ma.masked_less(small, QC_MIN_PROB)
        im = ax.imshow(
            overlay,
            extent=extent,
            cmap="jet",
            vmin=0.0,
            vmax=1.0,
            alpha=0.5,
            interpolation="nearest",
        )
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_title(
            f"{slide_id}: tumour probability (stride {stride_px} px, max {float(small.max()):.2f},"
            f" mask >= {threshold:g})",
            fontsize=9,
        )
        ax.set_xlabel("level-0 x (px)")
        ax.set_ylabel("level-0 y (px)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="tumour probability")
        fig.tight_layout()
        _write_png_atomic(fig, png)
    finally:
        plt.close(fig)


# -- stage ---------------------------------------------------------------------------------------
def stitch_slide(
    tiles_h5: str | Path,
    out_h5: str | Path,
    qc_png: str | Path | None,
    *,
    slide_path: str | Path | None,
    slide_id: str,
    threshold: float = DEFAULT_THRESHOLD,
    opening_um: float = DEFAULT_OPENING_UM,
    closing_um: float = DEFAULT_CLOSING_UM,
    mpp_fallback: float | None = None,
    strip_rows: int | None = None,
) -> dict[str, Any]:
    """Stitch ``tiles.h5`` into ``probmap.h5`` (``prob`` + ``mask``) and draw the QC heat map.

    Tiles are placed block row by block row (cropped at the slide edge) into a chunked,
    compressed HDF5 dataset; peak memory grows with the slide width, not its area.
    ``threshold`` is a probability; ``opening_um``/``closing_um`` are radii in um (0 = off).
    ``qc_png`` (the heat map over a slide thumbnail of ~12 um/px) needs ``slide_path``; either
    may be None to skip the picture. ``strip_rows`` (map rows per strip, rounded up to whole
    block rows) is for tests. Returns a summary.
    """
    t_start = time.perf_counter()
    check_slide_id(slide_id)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    attrs, geometry = read_tiles_meta(tiles_h5, slide_id)
    W, H = int(attrs["slide_width"]), int(attrs["slide_height"])
    mpp = float(attrs["mpp"])
    sd, T = geometry.Sd, geometry.tile_side
    rows, cols = math.ceil(H / sd), math.ceil(W / sd)
    cell_um = sd * mpp
    open_r, close_r = radius_cells(opening_um, cell_um), radius_cells(closing_um, cell_um)

    thumb = None
    if slide_path is not None:
        from .slide import open_slide

        with open_slide(slide_path, slide_id, mpp_fallback) as slide:
            if tuple(slide.dimensions) != (W, H):
                raise SlideError(
                    slide_id,
                    tiles_h5,
                    f"tiles were made for a {W}x{H} slide, but {slide_path} is "
                    f"{slide.dimensions[0]}x{slide.dimensions[1]}",
                )
            if qc_png is not None:
                thumb, _ = slide_thumbnail(slide)

    block_rows_per_strip = max(1, math.ceil((strip_rows or MIN_STRIP_ROWS) / T))
    strip_h = block_rows_per_strip * T
    out_h5 = Path(out_h5)
    placed = skipped = mask_cells = 0
    max_prob = 0.0

    def read(dataset, index) -> np.ndarray:
        """``dataset[index]``; unreadable (corrupt) data moves the tiles file aside."""
        try:
            return dataset[index]
        except (OSError, KeyError, RuntimeError) as exc:
            raise quarantine(tiles_h5, slide_id, "tiles file has unreadable data", exc)

    try:
        # the map is written to <out>.tmp and renamed when complete
        with h5py.File(tiles_h5, "r") as src, atomic_h5(out_h5) as (dst, check_writes):
            grid_xy = read(src["grid_xy"], ()).astype(np.int64).reshape(-1, 2)
            tiles = src["tiles"]
            chunks = (min(strip_h, rows), min(512, cols))
            opts = {"chunks": chunks, "compression": "gzip", "compression_opts": 1, "shuffle": True}
            prob_ds = dst.create_dataset("prob", shape=(rows, cols), dtype=np.float32, **opts)
            mask_ds = dst.create_dataset("mask", shape=(rows, cols), dtype=np.uint8, **opts)

            if len(np.unique(grid_xy, axis=0)) != len(grid_xy):
                raise SlideError(slide_id, tiles_h5, "tiles file holds the same block twice")
            bx_all, by_all = grid_xy[:, 0], grid_xy[:, 1]
            inside = (bx_all >= 0) & (by_all >= 0) & (bx_all * T < cols) & (by_all * T < rows)
            skipped = int((~inside).sum())
            if skipped:
                log.warning("%s: %d tiles lie outside the slide map, skipped", slide_id, skipped)
            kept = np.flatnonzero(inside)
            order = kept[np.lexsort((bx_all[kept], by_all[kept]))]  # by row (by), then bx
            strip_of = by_all[order] // block_rows_per_strip
            max_prob = 0.0
            for r0 in range(0, rows, strip_h):
                r1 = min(rows, r0 + strip_h)
                buffer = np.zeros((r1 - r0, cols), np.float32)
                lo, hi = np.searchsorted(strip_of, [r0 // strip_h, r0 // strip_h + 1])
                for k in order[lo:hi]:
                    bx, by = int(bx_all[k]), int(by_all[k])
                    y0, x0 = by * T - r0, bx * T
                    h, w = min(T, (r1 - r0) - y0), min(T, cols - x0)
                    buffer[y0 : y0 + h, x0 : x0 + w] = read(tiles, np.s_[int(k), :h, :w])
                    placed += 1
                prob_ds[r0:r1] = buffer
                check_writes()  # a failed write (disk full) stops the run here
                max_prob = max(max_prob, float(buffer.max(initial=0.0)))

            mask_cells = mask_in_strips(prob_ds, mask_ds, threshold, open_r, close_r, strip_h)
            check_writes()

            out_attrs: dict[str, Any] = dict(geometry.as_attrs())
            out_attrs.update(
                geometry_checksum=geometry.checksum(),
                stride_px=sd,
                origin_level0_xy=np.array([0, 0], np.int64),
                level=0,
                downsample=float(sd),
                mpp=mpp,
                slide_width=W,
                slide_height=H,
                slide_id=slide_id,
                model_checksum=str(attrs["model_checksum"]),
                dense_mode=str(attrs.get("dense_mode", "")),
                threshold=float(threshold),
                opening_um=float(opening_um),
                closing_um=float(closing_um),
                opening_radius_cells=open_r,
                closing_radius_cells=close_r,
                n_tiles=placed,
                wsiscan_version=__version__,
            )
            for key, value in out_attrs.items():
                dst.attrs[key] = value
            prob_ds.attrs["description"] = (
                "tumour probability; cell (i, j) covers level-0 [j*s, (j+1)*s) x [i*s, (i+1)*s), "
                "s = stride_px"
            )
            mask_ds.attrs["description"] = "prob >= threshold, opened then closed (disk radii)"
            if qc_png is not None:
                try:
                    _qc_heatmap(Path(qc_png), prob_ds, sd, (W, H), slide_id, threshold, thumb)
                except OSError as exc:
                    raise SlideError(
                        slide_id,
                        qc_png,
                        f"cannot write the QC heat map (nothing was written): {_first_line(exc)}",
                    ) from exc
    except OutputWriteError as exc:  # disk full, file too large, I/O error
        raise SlideError(
            slide_id,
            out_h5,
            f"cannot write the probability map (nothing was written): {_first_line(exc)}",
        ) from exc

    summary = {
        "slide_id": slide_id,
        "shape": (rows, cols),
        "stride_px": sd,
        "tiles": placed,
        "skipped_tiles": skipped,
        "max_prob": max_prob,
        "mask_cells": mask_cells,
        "opening_radius_cells": open_r,
        "closing_radius_cells": close_r,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    log.info(
        "%s: map %dx%d at %d px from %d tiles, max p %.3f, %d mask cells, %.1f s",
        slide_id,
        rows,
        cols,
        sd,
        placed,
        max_prob,
        mask_cells,
        summary["wall_s"],
    )
    return summary
