"""ROI grid: the blocks a slide is scanned with, chosen from the tissue mask; ``rois.h5``.

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
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import SlideError
from .faults import atomic_h5, h5_attrs, quarantine
from .geometry import Geometry
from .slide import open_slide
from .tissue import read_tissue_mask

log = logging.getLogger(__name__)

ROI_DATASETS = ("level0_xy", "grid_xy", "tissue_fraction")
ROI_ATTRS = (
    "geometry_checksum",
    "slide_id",
    "slide_width",
    "slide_height",
    "mpp",
    "mask_level",
    "mask_downsample_x",
    "mask_downsample_y",
    "min_tissue_fraction",
    "grid_shape",
    "wsiscan_version",
)
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


# -- rois.h5 -------------------------------------------------------------------------------------
def write_rois(
    path: str | Path,
    result: GridResult,
    geometry: Geometry,
    *,
    slide_id: str,
    slide_wh: tuple[int, int],
    mpp: float,
    mask_level: int,
    mask_downsample_xy: tuple[float, float],
    min_tissue_fraction: float,
) -> None:
    """Write ``results/{slide}/rois.h5`` atomically (``<path>.tmp``, then rename).

    Datasets ``level0_xy`` (N, 2) int64 (x, y), ``grid_xy`` (N, 2) int64 (bx, by),
    ``tissue_fraction`` (N,) float32; attributes: every ``Geometry.as_attrs()`` entry plus
    ``ROI_ATTRS``. N = 0 is valid (empty datasets) and logs a warning.
    """
    n = result.n_blocks
    attrs: dict[str, object] = dict(geometry.as_attrs())
    attrs.update(
        geometry_checksum=geometry.checksum(),
        slide_id=slide_id,
        slide_width=int(slide_wh[0]),
        slide_height=int(slide_wh[1]),
        mpp=float(mpp),
        mask_level=int(mask_level),
        mask_downsample_x=float(mask_downsample_xy[0]),
        mask_downsample_y=float(mask_downsample_xy[1]),
        min_tissue_fraction=float(min_tissue_fraction),
        grid_shape=np.asarray(result.grid_shape, dtype=np.int64),
        wsiscan_version=__version__,
    )
    with atomic_h5(path) as (f, _):
        f.create_dataset("level0_xy", data=result.level0_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("grid_xy", data=result.grid_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("tissue_fraction", data=result.tissue_fraction.astype(np.float32))
        for key, value in attrs.items():
            f.attrs[key] = value
    if n == 0:
        log.warning("%s: no tissue in any block: empty ROI grid written to %s", slide_id, path)


def read_rois(
    path: str | Path, slide_id: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and check ``rois.h5``: ``({"level0_xy", "grid_xy", "tissue_fraction"}, attrs)``.

    Attributes come back as plain Python values (``grid_shape`` a tuple). The geometry attributes
    must match the geometry re-derived from the network and its checksum; when ``slide_id`` is
    given it must match the file's. Raises :class:`SlideError` naming the slide and the file on a
    missing, corrupt or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "ROI grid file not found")
    try:
        with h5py.File(path, "r") as f:
            attrs: dict[str, Any] = h5_attrs(f)
            missing = [k for k in ROI_DATASETS if k not in f]
            arrays = {k: f[k][()] for k in ROI_DATASETS if k in f}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise quarantine(path, slide_id, "ROI grid file is not a readable HDF5 file", exc)
    who = slide_id or (str(attrs["slide_id"]) if "slide_id" in attrs else None)
    if missing:
        raise SlideError(who, path, f"ROI grid file lacks datasets {', '.join(missing)}")
    absent = [k for k in ROI_ATTRS + ("arch", "n", "alpha") if k not in attrs]
    if absent:
        raise SlideError(who, path, f"ROI grid file lacks attributes {', '.join(absent)}")
    if slide_id is not None and attrs["slide_id"] != slide_id:
        raise SlideError(slide_id, path, f"ROI grid file belongs to slide {attrs['slide_id']!r}")
    try:
        geometry = Geometry.from_attrs(attrs)
    except (ValueError, KeyError) as exc:
        raise SlideError(who, path, f"ROI grid geometry is invalid: {exc}")
    stale = {k: (attrs.get(k), v) for k, v in geometry.as_attrs().items() if attrs.get(k) != v}
    if stale:
        raise SlideError(who, path, f"ROI grid geometry attributes disagree: {stale}")
    n = arrays["tissue_fraction"].shape[0] if arrays["tissue_fraction"].ndim == 1 else -1
    for key, shape in (("level0_xy", (n, 2)), ("grid_xy", (n, 2)), ("tissue_fraction", (n,))):
        if n < 0 or arrays[key].shape != shape:
            raise SlideError(who, path, f"ROI grid dataset {key} has shape {arrays[key].shape}")
    arrays["level0_xy"] = arrays["level0_xy"].astype(np.int64, copy=False)
    arrays["grid_xy"] = arrays["grid_xy"].astype(np.int64, copy=False)
    arrays["tissue_fraction"] = arrays["tissue_fraction"].astype(np.float32, copy=False)
    grid_xy = arrays["grid_xy"]
    rows, cols = (int(v) for v in attrs["grid_shape"])
    if n and (grid_xy.min() < 0 or grid_xy[:, 0].max() >= cols or grid_xy[:, 1].max() >= rows):
        raise SlideError(who, path, f"ROI grid_xy outside the {rows}x{cols} grid")
    if not np.array_equal(arrays["level0_xy"], geometry.origin + grid_xy * geometry.Sr):
        raise SlideError(who, path, "ROI level0_xy disagrees with grid_xy and the geometry")
    return arrays, attrs


# -- stage ---------------------------------------------------------------------------------------
def compute_grid(
    slide_path: str | Path,
    mask_png: str | Path,
    out_rois_h5: str | Path,
    *,
    slide_id: str,
    arch: str = "vgg16",
    n: int,
    alpha: int,
    min_tissue_fraction: float = 0.0,
    mpp_fallback: float | None = None,
) -> dict[str, object]:
    """Stage ``roi_grid``: blocks of the network's geometry over the slide's tissue -> rois.h5.

    The geometry comes from :meth:`Geometry.for_arch` (derived from the layer list the model is
    built from). The mask must have been computed for this slide (same ID and size). Returns a
    summary (block count, grid shape, geometry checksum).
    """
    try:
        geometry = Geometry.for_arch(arch, n=n, alpha=alpha)
    except ValueError as exc:
        raise SlideError(slide_id, slide_path, f"invalid scan geometry: {exc}")
    mask, meta = read_tissue_mask(mask_png, slide_id=slide_id)
    with open_slide(slide_path, slide_id=slide_id, mpp_fallback=mpp_fallback) as slide:
        slide_wh = slide.dimensions
        mpp = slide.mpp
    if meta["slide_id"] != slide_id:
        raise SlideError(slide_id, mask_png, f"tissue mask belongs to slide {meta['slide_id']!r}")
    if (meta["slide_width"], meta["slide_height"]) != tuple(slide_wh):
        raise SlideError(
            slide_id,
            mask_png,
            f"tissue mask was made for a {meta['slide_width']}x{meta['slide_height']} px slide, "
            f"the slide is {slide_wh[0]}x{slide_wh[1]} px",
        )
    downsample = (float(meta["downsample_x"]), float(meta["downsample_y"]))
    result = block_grid(mask, downsample, slide_wh, geometry, min_tissue_fraction)
    write_rois(
        out_rois_h5,
        result,
        geometry,
        slide_id=slide_id,
        slide_wh=slide_wh,
        mpp=mpp,
        mask_level=int(meta["level"]),
        mask_downsample_xy=downsample,
        min_tissue_fraction=min_tissue_fraction,
    )
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
        min_tissue_fraction,
    )
    return {
        "slide_id": slide_id,
        "n_blocks": result.n_blocks,
        "grid_shape": result.grid_shape,
        "geometry_checksum": geometry.checksum(),
        "tissue_fraction": float(meta["tissue_fraction"]),
    }
