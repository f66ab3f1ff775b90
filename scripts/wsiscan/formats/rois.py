"""``results/{slide}/rois.h5``: the ROI grid a slide is scanned with (written by ``roi_grid``).

Layout (HDF5):

* ``level0_xy`` (N, 2) int64: block top-left ``(x, y)`` in level-0 px, ``origin + grid_xy * Sr``;
* ``grid_xy`` (N, 2) int64: block index ``(bx, by)``, row-major order (``by``, then ``bx``);
* ``tissue_fraction`` (N,) float32: tissue share of each block's output coverage;
* attributes: ``format`` (:data:`FORMAT`), every :meth:`Geometry.as_attrs` entry and
  ``geometry_checksum``, ``slide_id``, ``slide_width``, ``slide_height``, ``mpp`` (level-0 um/px),
  ``mask_level``, ``mask_downsample_x``/``_y``, ``min_tissue_fraction``, ``grid_shape`` (rows,
  cols of the full grid), ``wsiscan_version``.

N = 0 is valid (a slide without tissue). The reader re-derives the geometry from the network and
checks every attribute, shape and coordinate against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import SlideError
from ..fileio import atomic_h5, h5_attrs
from ..geometry import Geometry

FORMAT = "wsiscan-rois/1"
DATASETS = ("level0_xy", "grid_xy", "tissue_fraction")
ATTRS = (
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


@dataclass(frozen=True)
class RoiGrid:
    """The content of ``rois.h5``: the kept blocks of a slide and how they were chosen."""

    geometry: Geometry
    level0_xy: np.ndarray  # (N, 2) int64
    grid_xy: np.ndarray  # (N, 2) int64
    tissue_fraction: np.ndarray  # (N,) float32
    grid_shape: tuple[int, int]
    slide_id: str
    slide_wh: tuple[int, int]
    mpp: float
    mask_level: int
    mask_downsample_xy: tuple[float, float]
    min_tissue_fraction: float
    wsiscan_version: str = __version__

    @property
    def n_blocks(self) -> int:
        return int(self.level0_xy.shape[0])

    def attrs(self) -> dict[str, Any]:
        """The HDF5 attributes of this grid (also carried into ``tiles.h5``)."""
        attrs: dict[str, Any] = dict(self.geometry.as_attrs())
        attrs.update(
            geometry_checksum=self.geometry.checksum(),
            slide_id=self.slide_id,
            slide_width=int(self.slide_wh[0]),
            slide_height=int(self.slide_wh[1]),
            mpp=float(self.mpp),
            mask_level=int(self.mask_level),
            mask_downsample_x=float(self.mask_downsample_xy[0]),
            mask_downsample_y=float(self.mask_downsample_xy[1]),
            min_tissue_fraction=float(self.min_tissue_fraction),
            grid_shape=np.asarray(self.grid_shape, dtype=np.int64),
            wsiscan_version=self.wsiscan_version,
        )
        return attrs

    def subset(self, keep: np.ndarray) -> RoiGrid:
        """The grid with only the blocks ``keep`` (indices, in order)."""
        keep = np.asarray(keep, dtype=np.int64)
        return replace(
            self,
            level0_xy=self.level0_xy[keep],
            grid_xy=self.grid_xy[keep],
            tissue_fraction=self.tissue_fraction[keep],
        )


def write_rois(path: str | Path, grid: RoiGrid) -> None:
    """Write ``grid`` to ``path`` atomically."""
    n = grid.n_blocks
    with atomic_h5(path) as (f, _):
        f.create_dataset("level0_xy", data=grid.level0_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("grid_xy", data=grid.grid_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        f.attrs["format"] = FORMAT
        for key, value in grid.attrs().items():
            f.attrs[key] = value


def read_rois(path: str | Path, slide_id: str | None = None) -> RoiGrid:
    """Read and check ``rois.h5``.

    The geometry attributes must equal the geometry re-derived from the network and its checksum;
    when ``slide_id`` is given it must be the file's. Raises :class:`SlideError` naming the slide
    and the file on a missing, corrupt or inconsistent file.
    """
    import h5py

    from ..faults import unreadable

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "ROI grid file not found")
    try:
        with h5py.File(path, "r") as f:
            attrs: dict[str, Any] = h5_attrs(f)
            missing = [k for k in DATASETS if k not in f]
            arrays = {k: f[k][()] for k in DATASETS if k in f}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise unreadable(path, slide_id, "ROI grid file is not a readable HDF5 file", exc, FORMAT)
    who = slide_id or (str(attrs["slide_id"]) if "slide_id" in attrs else None)
    if attrs.get("format", FORMAT) != FORMAT:
        raise SlideError(who, path, f"not a wsiscan ROI grid (format {attrs['format']!r})")
    if missing:
        raise SlideError(who, path, f"ROI grid file lacks datasets {', '.join(missing)}")
    absent = [k for k in ATTRS + ("arch", "n", "alpha") if k not in attrs]
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
    fractions = arrays["tissue_fraction"]
    n = fractions.shape[0] if fractions.ndim == 1 else -1
    for key, shape in (("level0_xy", (n, 2)), ("grid_xy", (n, 2)), ("tissue_fraction", (n,))):
        if n < 0 or arrays[key].shape != shape:
            raise SlideError(who, path, f"ROI grid dataset {key} has shape {arrays[key].shape}")
    level0_xy = arrays["level0_xy"].astype(np.int64, copy=False)
    grid_xy = arrays["grid_xy"].astype(np.int64, copy=False)
    rows, cols = (int(v) for v in attrs["grid_shape"])
    if n and (grid_xy.min() < 0 or grid_xy[:, 0].max() >= cols or grid_xy[:, 1].max() >= rows):
        raise SlideError(who, path, f"ROI grid_xy outside the {rows}x{cols} grid")
    if not np.array_equal(level0_xy, geometry.origin + grid_xy * geometry.Sr):
        raise SlideError(who, path, "ROI level0_xy disagrees with grid_xy and the geometry")
    return RoiGrid(
        geometry=geometry,
        level0_xy=level0_xy,
        grid_xy=grid_xy,
        tissue_fraction=fractions.astype(np.float32, copy=False),
        grid_shape=(rows, cols),
        slide_id=str(attrs["slide_id"]),
        slide_wh=(int(attrs["slide_width"]), int(attrs["slide_height"])),
        mpp=float(attrs["mpp"]),
        mask_level=int(attrs["mask_level"]),
        mask_downsample_xy=(float(attrs["mask_downsample_x"]), float(attrs["mask_downsample_y"])),
        min_tissue_fraction=float(attrs["min_tissue_fraction"]),
        wsiscan_version=str(attrs["wsiscan_version"]),
    )
