"""ROI grid: the blocks a slide is scanned with, chosen from the tissue mask (stage ``roi_grid``).

Grid convention (see :mod:`wsiscan.geometry`): block ``(bx, by)`` has its level-0 top-left at
``(origin + bx*Sr, origin + by*Sr)`` and side ``block_side``; its dense tile covers the level-0
*output coverage* ``[bx*Sr, (bx+1)*Sr) x [by*Sr, (by+1)*Sr)``. Coverage rectangles of all blocks
tile the plane, so tiles of neighbouring blocks abut with no gap and no overlap. Blocks run over
``bx < ceil(W/Sr)``, ``by < ceil(H/Sr)``: the last column/row reaches past the slide border, which
reads white.

A block is kept when the tissue in its output coverage is more than zero and at least
``min_tissue_fraction`` of the coverage area ``Sr^2`` (tissue outside the slide does not exist).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError
from .formats.rois import RoiGrid, write_rois
from .formats.tissue_mask import check_mask_fits, read_tissue_mask
from .geometry import Geometry
from .params import RoiGridParams
from .slide import open_slide

log = logging.getLogger(__name__)

_EDGE_EPS = 1e-9  # mask-pixel units: an edge this close to a pixel border touches no area


@dataclass(frozen=True)
class GridResult:
    """Kept blocks in row-major order (``by`` then ``bx``).

    ``level0_xy`` (N, 2) int64 block top-left (x, y) in level-0 px; ``grid_xy`` (N, 2) int64
    block index (bx, by); ``tissue_fraction`` (N,) float32 tissue share of each block's output
    coverage; ``grid_shape`` (rows, cols) of the full grid; ``fraction_map`` (rows, cols) float32
    the tissue share of every block, kept or not.
    """

    level0_xy: np.ndarray
    grid_xy: np.ndarray
    tissue_fraction: np.ndarray
    grid_shape: tuple[int, int]
    fraction_map: np.ndarray

    @property
    def n_blocks(self) -> int:
        return int(self.level0_xy.shape[0])


def _interp_rows(table: np.ndarray, pos_px: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``table`` rows at fractional row positions (clamped to the table)."""
    pos = np.clip(pos_px, 0, table.shape[0] - 1)
    i = np.minimum(np.floor(pos).astype(np.int64), table.shape[0] - 2)
    t = (pos - i)[:, None]
    return table[i] * (1 - t) + table[i + 1] * t


def block_grid(
    mask: np.ndarray,
    mask_downsample_xy: tuple[float, float],
    slide_wh: tuple[int, int],
    geometry: Geometry,
    min_tissue_fraction: float = 0.0,
) -> GridResult:
    """Blocks of ``geometry`` over a ``slide_wh`` (level-0 px) slide whose tissue ``mask`` pixel
    ``(i, j)`` covers level-0 ``[j*dx, (j+1)*dx) x [i*dy, (i+1)*dy)``, ``(dx, dy) =
    mask_downsample_xy``.

    The tissue share of each block's output coverage is exact for that piecewise-constant mask
    (bilinear interpolation of the mask's integral image at the coverage corners); whether any
    tissue touches a block is decided on an integer integral image, so ``fraction > 0`` is exact.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    dx, dy = (float(v) for v in mask_downsample_xy)
    width, height = (int(v) for v in slide_wh)
    if not (dx > 0 and dy > 0):
        raise ValueError(f"mask downsample must be > 0, got {mask_downsample_xy}")
    if width <= 0 or height <= 0:
        raise ValueError(f"slide size must be positive, got {slide_wh}")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")

    sr = geometry.Sr
    rows, cols = math.ceil(height / sr), math.ceil(width / sr)
    # coverage edges in level-0 px, clipped to the slide (nothing is tissue outside it)
    x_edges = np.minimum(np.arange(cols + 1, dtype=np.float64) * sr, width)
    y_edges = np.minimum(np.arange(rows + 1, dtype=np.float64) * sr, height)

    counts = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask.astype(bool), axis=0, dtype=np.int64), axis=1, out=counts[1:, 1:])

    # area: the integral image is bilinear inside each mask pixel, so interpolation is exact
    integral = _interp_rows(counts.astype(np.float64), y_edges / dy)
    integral = _interp_rows(integral.T, x_edges / dx).T  # (rows + 1, cols + 1), in mask px
    area = integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]
    fraction = np.clip(area * (dx * dy) / float(sr * sr), 0.0, 1.0).astype(np.float32)

    # touch: mask pixels overlapping each coverage with positive area, counted exactly
    def pixel_span(edges: np.ndarray, d: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        first = np.clip(np.floor(edges[:-1] / d + _EDGE_EPS), 0, n).astype(np.int64)
        stop = np.clip(np.ceil(edges[1:] / d - _EDGE_EPS), 0, n).astype(np.int64)
        return first, np.maximum(stop, first)

    i0, i1 = pixel_span(y_edges, dy, mask.shape[0])
    j0, j1 = pixel_span(x_edges, dx, mask.shape[1])
    touched = (
        counts[np.ix_(i1, j1)]
        - counts[np.ix_(i0, j1)]
        - counts[np.ix_(i1, j0)]
        + counts[np.ix_(i0, j0)]
    ) > 0

    keep = touched & (fraction >= min_tissue_fraction)
    by, bx = np.nonzero(keep)
    grid_xy = np.stack([bx, by], axis=1).astype(np.int64).reshape(-1, 2)
    level0_xy = (geometry.origin + grid_xy * sr).astype(np.int64)
    fraction_map = np.where(touched, fraction, np.float32(0))
    return GridResult(
        level0_xy=level0_xy,
        grid_xy=grid_xy,
        tissue_fraction=fraction_map[by, bx].astype(np.float32),
        grid_shape=(rows, cols),
        fraction_map=fraction_map,
    )


# -- stage ---------------------------------------------------------------------------------------
def roi_grid(
    slide: str | Path,
    mask: str | Path,
    out_rois: str | Path,
    params: RoiGridParams,
    *,
    slide_id: str,
) -> dict[str, object]:
    """Stage ``roi_grid``: blocks of the network's geometry over the slide's tissue -> ``rois.h5``.

    The geometry is derived from the layer list the model is built from
    (:meth:`Geometry.for_arch`). The mask must have been made for this slide (same ID and size);
    its ``slide_mpp`` (resolved by ``tissue_mask``) is the grid's ``mpp``. Returns a summary.
    """
    try:
        geometry = Geometry.for_arch(params.arch, n=params.n, alpha=params.alpha)
    except ValueError as exc:
        raise SlideError(slide_id, slide, f"invalid scan geometry: {exc}")
    tissue, meta = read_tissue_mask(mask, slide_id=slide_id)
    with open_slide(slide, slide_id=slide_id) as s:
        slide_wh = s.dimensions
    check_mask_fits(meta, slide_wh, slide_id, mask)
    downsample = (float(meta["downsample_x"]), float(meta["downsample_y"]))
    result = block_grid(tissue, downsample, slide_wh, geometry, params.min_tissue_fraction)
    grid = RoiGrid(
        geometry=geometry,
        level0_xy=result.level0_xy,
        grid_xy=result.grid_xy,
        tissue_fraction=result.tissue_fraction,
        grid_shape=result.grid_shape,
        slide_id=slide_id,
        slide_wh=tuple(slide_wh),
        mpp=float(meta["slide_mpp"]),
        mask_level=int(meta["level"]),
        mask_downsample_xy=downsample,
        min_tissue_fraction=params.min_tissue_fraction,
    )
    write_rois(out_rois, grid)
    rows, cols = result.grid_shape
    log.info(
        "%s: %d of %d blocks kept (grid %dx%d, Sr %d px, block %d px, min tissue fraction %g)",
        slide_id,
        result.n_blocks,
        rows * cols,
        rows,
        cols,
        geometry.Sr,
        geometry.block_side,
        params.min_tissue_fraction,
    )
    if result.n_blocks == 0:
        log.warning("%s: no tissue in any block: empty ROI grid written to %s", slide_id, out_rois)
    return {
        "slide_id": slide_id,
        "n_blocks": result.n_blocks,
        "grid_shape": result.grid_shape,
        "geometry_checksum": geometry.checksum(),
        "tissue_fraction": float(meta["tissue_fraction"]),
    }
