"""The ``stitch`` stage: dense tiles into the slide-level probability map and lesion mask.

The map and its layout are :mod:`wsiscan.formats.probmap`; the mask is ``prob >= threshold``
followed by a binary opening then closing with disks of radius ``opening_radius_um`` /
``closing_radius_um`` (converted to cells by ``Sd * mpp``; 0 = off). The image border does not
erode or dilate (``mode="ignore"``).

Confinement to tissue (``confine_to_tissue``, on by default): the ROI blocks cover glass around
the tissue, where pen ink, labels and dust can look like anything to the network. The map is set
to 0 in every cell whose centre lies farther than ``tissue_margin_um`` from the slide's tissue
mask (``tissue.png``; the distance is the exact Euclidean distance on the mask's raster, so it is
accurate to one mask pixel), so those cells give no lesion point, no lesion mask and no slide
score. Cells at or above ``threshold`` that the confinement removed are kept in the ``masked``
dataset and drawn on the QC heat map, with the outline of the confinement.

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
from .errors import ConfigError, SlideError
from .fileio import OutputWriteError, atomic_write
from .formats.probmap import write_probmap
from .formats.tiles import TilesFile, TilesHeader, open_tiles
from .formats.tissue_mask import check_mask_fits, read_tissue_mask
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
    png: str | Path,
    prob_ds,
    masked_ds,
    header: TilesHeader,
    threshold: float,
    thumb: np.ndarray | None,
    confinement: Confinement | None,
) -> None:
    """The QC heat map (probability over the thumbnail; the confinement to tissue outlined and
    the cells it removed marked) as a PNG; :class:`SlideError` when it cannot be written."""
    try:
        _draw_heatmap(
            Path(png), prob_ds, masked_ds, header.geometry.Sd, header.slide_wh, header.slide_id,
            threshold, thumb, confinement,
        )  # fmt: skip
    except OSError as exc:
        raise SlideError(
            header.slide_id,
            png,
            f"cannot write the QC heat map (nothing was written): {_first_line(exc)}",
        ) from exc


def _reduce(ds, factor: int, func) -> np.ndarray:
    """``block_reduce(ds, (factor, factor), func)`` read in bands (a 2-D dataset or array)."""
    from skimage.measure import block_reduce

    rows = ds.shape[0]
    step = factor * max(1, 1024 // factor)
    return np.concatenate(
        [
            block_reduce(ds[r : min(rows, r + step)], (factor, factor), func, cval=0)
            for r in range(0, rows, step)
        ],
        axis=0,
    )


def _draw_heatmap(
    png: Path,
    prob_ds,
    masked_ds,
    stride_px: int,
    slide_wh: tuple[int, int],
    slide_id: str,
    threshold: float,
    thumb: np.ndarray | None,
    confinement: Confinement | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = prob_ds.shape
    factor = max(1, math.ceil(max(rows, cols) / QC_MAX_SIDE))
    small = _reduce(prob_ds, factor, np.max)
    removed = _reduce(masked_ds, factor, np.max) > 0
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
        title = (
            f"{slide_id}: tumour probability (stride {stride_px} px, max {float(small.max()):.2f},"
            f" mask >= {threshold:g})"
        )
        if confinement is not None:
            dsx, dsy = confinement.downsample_xy
            h_mask, w_mask = confinement.allowed.shape
            if confinement.allowed.any() and not confinement.allowed.all():
                ax.contour(
                    confinement.allowed.astype(np.float32),
                    levels=[0.5],
                    colors="0.15",
                    linewidths=0.8,
                    linestyles="dashed",
                    extent=(0, w_mask * dsx, 0, h_mask * dsy),
                    origin="upper",
                )
            title += "\ndashed: the map is confined to the tissue"
            if removed.any():
                ys, xs = np.nonzero(removed)
                ax.scatter((xs + 0.5) * cell, (ys + 0.5) * cell, s=8, marker="x", c="black")
                title += f"; x: {int(removed.sum())} places >= {threshold:g} set to 0 there"
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_title(title, fontsize=9)
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


@dataclass(frozen=True)
class Confinement:
    """Where the map may be non-zero: the dilated tissue mask (at the mask's resolution) and, per
    map row and column, the mask pixel holding the cell centre."""

    allowed: np.ndarray  # bool (mask rows, mask cols)
    mask_row: np.ndarray  # int64 (map rows,)
    mask_col: np.ndarray  # int64 (map cols,)
    downsample_xy: tuple[float, float]  # level-0 px per mask px

    def cells(self, r0: int, r1: int) -> np.ndarray:
        """bool (r1 - r0, map cols): the cells of map rows ``r0 .. r1-1`` that stay."""
        return self.allowed[np.ix_(self.mask_row[r0:r1], self.mask_col)]


def allowed_region(
    mask_png: str | Path,
    slide_id: str,
    slide_wh: tuple[int, int],
    mpp: float,
    margin_um: float,
) -> tuple[np.ndarray, tuple[float, float]]:
    """The tissue mask dilated by ``margin_um`` (bool, at the mask's resolution; Euclidean
    distance on the mask raster, anisotropic downsamples included) and the mask's level-0 px per
    mask px ``(x, y)``."""
    from scipy import ndimage as ndi

    tissue, meta = read_tissue_mask(mask_png, slide_id)
    check_mask_fits(meta, slide_wh, slide_id, mask_png)
    dsx, dsy = float(meta["downsample_x"]), float(meta["downsample_y"])
    if tissue.any():
        spacing_um = (dsy * mpp, dsx * mpp)
        allowed = ndi.distance_transform_edt(~tissue, sampling=spacing_um) <= margin_um
    else:
        allowed = np.zeros(tissue.shape, bool)
    return allowed, (dsx, dsy)


def tissue_confinement(
    mask_png: str | Path, header: TilesHeader, layout: MapLayout, margin_um: float
) -> Confinement:
    """The confinement of the map of ``header``'s slide by its tissue mask dilated by
    ``margin_um`` (Euclidean distance on the mask raster, anisotropic downsamples included)."""
    allowed, (dsx, dsy) = allowed_region(
        mask_png, header.slide_id, header.slide_wh, header.mpp, margin_um
    )
    centres = (np.arange(max(layout.rows, layout.cols)) + 0.5) * layout.stride_px
    row = np.clip(np.floor(centres[: layout.rows] / dsy), 0, allowed.shape[0] - 1)
    col = np.clip(np.floor(centres[: layout.cols] / dsx), 0, allowed.shape[1] - 1)
    return Confinement(allowed, row.astype(np.int64), col.astype(np.int64), (dsx, dsy))


def confine_strip(
    buffer: np.ndarray, r0: int, confinement: Confinement | None, threshold: float
) -> np.ndarray:
    """Zero the cells of ``buffer`` (map rows ``r0 ..``) outside the confinement, in place;
    returns the uint8 ``masked`` strip: 1 where a cell at or above ``threshold`` was zeroed."""
    if confinement is None:
        return np.zeros(buffer.shape, np.uint8)
    outside = ~confinement.cells(r0, r0 + buffer.shape[0])
    masked = (outside & (buffer >= threshold)).astype(np.uint8)
    buffer[outside] = 0.0
    return masked


def place_tiles(
    src: TilesFile,
    dst: Any,
    layout: MapLayout,
    confinement: Confinement | None,
    threshold: float,
) -> dict:
    """Write every tile of ``src`` into ``dst.prob`` (rows x cols), strip by strip, confined to
    tissue (cells removed at or above ``threshold`` go to ``dst.masked``); tiles outside the map
    are skipped with a warning, a block given twice is an error. Returns counts and the maximum
    probability kept and removed."""
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
    masked_cells, masked_max = 0, 0.0
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
        raw_max = float(buffer.max(initial=0.0))
        masked = confine_strip(buffer, r0, confinement, threshold)
        if masked.any():
            masked_cells += int(masked.sum())
            masked_max = max(masked_max, raw_max)
        dst.prob[r0:r1] = buffer
        dst.masked[r0:r1] = masked
        dst.check()  # a failed write (disk full) stops the run here
        max_prob = max(max_prob, float(buffer.max(initial=0.0)))
    return {
        "placed": placed,
        "skipped": skipped,
        "max_prob": max_prob,
        "masked_cells": masked_cells,
        "masked_max_prob": masked_max,
    }


def probmap_attrs(
    header: TilesHeader, layout: MapLayout, params: StitchParams, counts: dict[str, Any]
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
        confine_to_tissue=bool(params.confine_to_tissue),
        tissue_margin_um=float(params.tissue_margin_um),
        n_tiles=counts["placed"],
        masked_cells=counts["masked_cells"],
        masked_max_prob=float(counts["masked_max_prob"]),
        wsiscan_version=__version__,
    )
    return attrs


# -- stage ---------------------------------------------------------------------------------------
def stitch(
    slide: str | Path | None,
    tiles: str | Path,
    mask: str | Path | None,
    out_probmap: str | Path,
    out_qc: str | Path | None,
    params: StitchParams,
    *,
    slide_id: str,
    strip_rows: int | None = None,
) -> dict[str, Any]:
    """Stage ``stitch``: ``tiles.h5`` -> ``probmap.h5`` (``prob``, ``mask``, ``masked``) and the
    QC heat map.

    Tiles are placed block row by block row (cropped at the slide edge) into a chunked,
    compressed HDF5 dataset; peak memory grows with the slide width, not its area. With
    ``params.confine_to_tissue`` the map is confined to the tissue of ``mask`` (``tissue.png``).
    The heat map (over a slide thumbnail of ~12 um/px) needs ``slide``; either may be None to skip
    the picture. ``strip_rows`` (map rows per strip, rounded up to whole block rows) is for tests.
    Returns a summary.
    """
    t_start = time.perf_counter()
    tiles = Path(tiles)
    if params.confine_to_tissue and mask is None:
        raise ConfigError(
            "stitch.confine_to_tissue needs the tissue mask (--mask tissue.png); "
            "--no-confine-to-tissue stitches without it"
        )
    try:
        with open_tiles(tiles, slide_id) as src:
            header = src.header
            layout = map_layout(header, params, strip_rows)
            confinement = None
            if params.confine_to_tissue:
                confinement = tissue_confinement(mask, header, layout, params.tissue_margin_um)
            thumb = read_thumbnail(slide, header, tiles) if out_qc is not None else None
            shape = (layout.rows, layout.cols)
            with write_probmap(out_probmap, shape, layout.strip_rows) as dst:
                counts = place_tiles(src, dst, layout, confinement, params.threshold)
                mask_cells = mask_in_strips(
                    dst.prob, dst.mask, params.threshold, layout.open_r, layout.close_r,
                    layout.strip_rows,
                )  # fmt: skip
                dst.check()
                for key, value in probmap_attrs(header, layout, params, counts).items():
                    dst.attrs[key] = value
                if out_qc is not None:
                    write_heatmap(
                        out_qc, dst.prob, dst.masked, header, params.threshold, thumb, confinement
                    )
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
        "masked_cells": counts["masked_cells"],
        "masked_max_prob": counts["masked_max_prob"],
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    if counts["masked_cells"]:
        log.info(
            "%s: %d cells >= %g outside the tissue (+%g um) set to 0 (max p %.3f there)",
            slide_id,
            counts["masked_cells"],
            params.threshold,
            params.tissue_margin_um,
            counts["masked_max_prob"],
        )
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
