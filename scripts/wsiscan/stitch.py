"""The ``stitch`` stage: dense tiles into the slide-level probability map and lesion mask.

The map and its layout are :mod:`wsiscan.formats.probmap`; the mask is ``prob >= threshold``
followed by a binary opening then closing with disks of radius ``opening_radius_um`` /
``closing_radius_um`` (converted to cells by ``Sd * mpp``; 0 = off). The image border does not
erode or dilate (``mode="ignore"``).

Memory stays bounded by the slide *width*: tiles are placed one strip of block rows at a time
into a chunked HDF5 dataset, and the mask is computed strip by strip with a halo of rows wide
enough for the morphology (so it equals the whole-map result exactly).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import SlideError
from .fileio import OutputWriteError, atomic_write
from .formats.probmap import write_probmap
from .formats.tiles import TilesFile, TilesHeader, open_tiles
from .params import StitchParams

log = logging.getLogger(__name__)

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


def write_heatmap(
    png: str | Path, prob_ds, header: TilesHeader, threshold: float, thumb: np.ndarray | None
) -> None:
    """The QC heat map (probability over the thumbnail) as a PNG; :class:`SlideError` when it
    cannot be written."""
    try:
        _draw_heatmap(
            Path(png),
            prob_ds,
            header.geometry.Sd,
            header.slide_wh,
            header.slide_id,
            threshold,
            thumb,
        )
    except OSError as exc:
        raise SlideError(
            header.slide_id,
            png,
            f"cannot write the QC heat map (nothing was written): {_first_line(exc)}",
        ) from exc


def _draw_heatmap(
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
        with atomic_write(png) as fh:
            fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


# -- the parts of the stage ------------------------------------------------------------------------
@dataclass(frozen=True)
class MapLayout:
    """The map of a slide: ``rows x cols`` cells at ``stride_px``, strips of whole block rows, the
    morphology radii in cells."""

    rows: int
    cols: int
    stride_px: int
    tile_side: int
    block_rows_per_strip: int
    open_r: int
    close_r: int

    @property
    def strip_rows(self) -> int:
        return self.block_rows_per_strip * self.tile_side


def map_layout(header: TilesHeader, params: StitchParams, strip_rows: int | None) -> MapLayout:
    """The layout of the map of ``header``'s slide for ``params`` (strips of at least
    ``strip_rows`` map rows, rounded up to whole block rows)."""
    W, H = header.slide_wh
    sd, t = header.geometry.Sd, header.geometry.tile_side
    cell_um = sd * header.mpp
    return MapLayout(
        rows=math.ceil(H / sd),
        cols=math.ceil(W / sd),
        stride_px=sd,
        tile_side=t,
        block_rows_per_strip=max(1, math.ceil((strip_rows or MIN_STRIP_ROWS) / t)),
        open_r=radius_cells(params.opening_radius_um, cell_um),
        close_r=radius_cells(params.closing_radius_um, cell_um),
    )


def read_thumbnail(slide_path: str | Path | None, header: TilesHeader, tiles: Path):
    """The QC thumbnail of the slide (None without ``slide_path``); the slide must have the size
    the tiles were made for."""
    if slide_path is None:
        return None
    from .slide import open_slide

    with open_slide(slide_path, header.slide_id, mpp_fallback=header.mpp) as slide:
        if tuple(slide.dimensions) != header.slide_wh:
            W, H = header.slide_wh
            raise SlideError(
                header.slide_id,
                tiles,
                f"tiles were made for a {W}x{H} slide, but {slide_path} is "
                f"{slide.dimensions[0]}x{slide.dimensions[1]}",
            )
        thumb, _ = slide_thumbnail(slide)
    return thumb


def place_tiles(src: TilesFile, prob_out: Any, layout: MapLayout, check_writes: Any) -> dict:
    """Write every tile of ``src`` into ``prob_out`` (rows x cols), strip by strip; tiles outside
    the map are skipped with a warning, a block given twice is an error. Returns counts and the
    maximum probability."""
    grid_xy = src.grid_xy
    slide_id, T = src.header.slide_id, layout.tile_side
    rows, cols = layout.rows, layout.cols
    if len(np.unique(grid_xy, axis=0)) != len(grid_xy):
        raise SlideError(slide_id, src.path, "tiles file holds the same block twice")
    bx_all, by_all = grid_xy[:, 0], grid_xy[:, 1]
    inside = (bx_all >= 0) & (by_all >= 0) & (bx_all * T < cols) & (by_all * T < rows)
    skipped = int((~inside).sum())
    if skipped:
        log.warning("%s: %d tiles lie outside the slide map, skipped", slide_id, skipped)
    kept = np.flatnonzero(inside)
    order = kept[np.lexsort((bx_all[kept], by_all[kept]))]  # by row (by), then bx
    strip_of = by_all[order] // layout.block_rows_per_strip
    placed, max_prob, strip_h = 0, 0.0, layout.strip_rows
    for r0 in range(0, rows, strip_h):
        r1 = min(rows, r0 + strip_h)
        buffer = np.zeros((r1 - r0, cols), np.float32)
        lo, hi = np.searchsorted(strip_of, [r0 // strip_h, r0 // strip_h + 1])
        for k in order[lo:hi]:
            bx, by = int(bx_all[k]), int(by_all[k])
            y0, x0 = by * T - r0, bx * T
            h, w = min(T, (r1 - r0) - y0), min(T, cols - x0)
            buffer[y0 : y0 + h, x0 : x0 + w] = src.tile(int(k), h, w)
            placed += 1
        prob_out[r0:r1] = buffer
        check_writes()  # a failed write (disk full) stops the run here
        max_prob = max(max_prob, float(buffer.max(initial=0.0)))
    return {"placed": placed, "skipped": skipped, "max_prob": max_prob}


def probmap_attrs(
    header: TilesHeader, layout: MapLayout, params: StitchParams, placed: int
) -> dict[str, Any]:
    """The attributes of ``probmap.h5`` (see :mod:`wsiscan.formats.probmap`)."""
    geometry = header.geometry
    W, H = header.slide_wh
    attrs: dict[str, Any] = dict(geometry.as_attrs())
    attrs.update(
        geometry_checksum=geometry.checksum(),
        stride_px=layout.stride_px,
        origin_level0_xy=np.array([0, 0], np.int64),
        level=0,
        downsample=float(layout.stride_px),
        mpp=header.mpp,
        slide_width=W,
        slide_height=H,
        slide_id=header.slide_id,
        model_checksum=header.model_checksum,
        dense_mode=str(header.attrs.get("dense_mode", "")),
        threshold=float(params.threshold),
        opening_radius_um=float(params.opening_radius_um),
        closing_radius_um=float(params.closing_radius_um),
        opening_radius_cells=layout.open_r,
        closing_radius_cells=layout.close_r,
        n_tiles=placed,
        wsiscan_version=__version__,
    )
    return attrs


# -- stage ---------------------------------------------------------------------------------------
def stitch(
    slide: str | Path | None,
    tiles: str | Path,
    out_probmap: str | Path,
    out_qc: str | Path | None,
    params: StitchParams,
    *,
    slide_id: str,
    strip_rows: int | None = None,
) -> dict[str, Any]:
    """Stage ``stitch``: ``tiles.h5`` -> ``probmap.h5`` (``prob`` + ``mask``) and the QC heat map.

    Tiles are placed block row by block row (cropped at the slide edge) into a chunked,
    compressed HDF5 dataset; peak memory grows with the slide width, not its area. The heat map
    (over a slide thumbnail of ~12 um/px) needs ``slide``; either may be None to skip the
    picture. ``strip_rows`` (map rows per strip, rounded up to whole block rows) is for tests.
    Returns a summary.
    """
    t_start = time.perf_counter()
    tiles = Path(tiles)
    try:
        with open_tiles(tiles, slide_id) as src:
            header = src.header
            layout = map_layout(header, params, strip_rows)
            thumb = read_thumbnail(slide, header, tiles) if out_qc is not None else None
            shape = (layout.rows, layout.cols)
            with write_probmap(out_probmap, shape, layout.strip_rows) as dst:
                counts = place_tiles(src, dst.prob, layout, dst.check)
                mask_cells = mask_in_strips(
                    dst.prob, dst.mask, params.threshold, layout.open_r, layout.close_r,
                    layout.strip_rows,
                )  # fmt: skip
                dst.check()
                for key, value in probmap_attrs(header, layout, params, counts["placed"]).items():
                    dst.attrs[key] = value
                if out_qc is not None:
                    write_heatmap(out_qc, dst.prob, header, params.threshold, thumb)
    except OutputWriteError as exc:  # disk full, file too large, I/O error
        raise SlideError(
            slide_id,
            out_probmap,
            f"cannot write the probability map (nothing was written): {_first_line(exc)}",
        ) from exc
    summary = {
        "slide_id": slide_id,
        "shape": (layout.rows, layout.cols),
        "stride_px": layout.stride_px,
        "tiles": counts["placed"],
        "skipped_tiles": counts["skipped"],
        "max_prob": counts["max_prob"],
        "mask_cells": mask_cells,
        "opening_radius_cells": layout.open_r,
        "closing_radius_cells": layout.close_r,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    log.info(
        "%s: map %dx%d at %d px from %d tiles, max p %.3f, %d mask cells, %.1f s",
        slide_id,
        layout.rows,
        layout.cols,
        layout.stride_px,
        counts["placed"],
        counts["max_prob"],
        mask_cells,
        summary["wall_s"],
    )
    return summary
