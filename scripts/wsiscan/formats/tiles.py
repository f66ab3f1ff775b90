"""``results/{slide}/tiles.h5``: the dense tile of every ROI block (written by ``infer``).

Layout (HDF5):

* ``tiles`` (N, T, T) float32 or float16: tumour probability, ``T = tile_side``; tile ``k``,
  cell ``(r, c)`` is cell ``(by*T + r, bx*T + c)`` of the slide map at stride ``Sd``, with
  ``(bx, by) = grid_xy[k]``; chunked one tile per chunk, gzip level 1;
* ``grid_xy``, ``level0_xy``, ``tissue_fraction``: those of ``rois.h5``, same order;
* attributes: ``format`` (:data:`FORMAT`), those of ``rois.h5`` (:meth:`RoiGrid.attrs`) plus
  ``model_checksum`` (SHA-256 of the model file), ``model_arch``, ``model_width``,
  ``model_batchnorm``, ``dense_mode``, ``amp``, ``device``, ``tile_dtype``, ``wsiscan_version``,
  ``stain_normalisation`` (``none``, or ``macenko`` when the model keeps a stain reference) and,
  when normalised, ``stain_fit_json`` (the slide's fit and the reference, JSON).

:func:`write_tiles` streams tiles in block order (memory does not grow with the slide);
:class:`TilesFile` reads them back in any order, checked against the header.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..fileio import atomic_h5, h5_attrs
from ..geometry import Geometry
from .rois import RoiGrid

FORMAT = "wsiscan-tiles/1"
TILE_DTYPES = ("float32", "float16")
#: Attributes of the model that computed the tiles (besides the grid's).
MODEL_ATTRS = (
    "model_checksum",
    "model_arch",
    "model_width",
    "model_batchnorm",
    "dense_mode",
    "amp",
    "device",
    "tile_dtype",
)


class TilesWriter:
    """Writes the tiles of consecutive blocks into an open ``tiles.h5`` (see :func:`write_tiles`)."""

    def __init__(self, dataset: Any, check: Any) -> None:
        self._tiles = dataset
        self._check = check
        self.written = 0

    def write(self, start: int, tiles: np.ndarray) -> None:
        """Tiles ``(k, T, T)`` of blocks ``start .. start + k - 1``; a failed write (disk full)
        raises :class:`wsiscan.fileio.OutputWriteError` here."""
        tiles = np.asarray(tiles)
        self._tiles[start : start + len(tiles)] = tiles.astype(self._tiles.dtype, copy=False)
        self._check()
        self.written += len(tiles)


@contextmanager
def write_tiles(
    path: str | Path, grid: RoiGrid, model: dict[str, Any], tile_dtype: str = "float32"
) -> Iterator[TilesWriter]:
    """Create ``tiles.h5`` for the blocks of ``grid`` (atomically: the file appears complete when
    the block ends). ``model``: the :data:`MODEL_ATTRS` values (``tile_dtype`` is added)."""
    if tile_dtype not in TILE_DTYPES:
        raise ValueError(f"tile_dtype must be one of {TILE_DTYPES}, got {tile_dtype!r}")
    missing = [k for k in MODEL_ATTRS if k not in model and k != "tile_dtype"]
    if missing:
        raise ValueError(f"tiles.h5 needs the model attributes {missing}")
    n, t = grid.n_blocks, grid.geometry.tile_side
    with atomic_h5(path) as (f, check):
        f.attrs["format"] = FORMAT
        for key, value in {**grid.attrs(), **model, "tile_dtype": tile_dtype}.items():
            f.attrs[key] = value
        # no chunk cache (HDF5 keeps none larger than its size): each tile is compressed and
        # written when it comes, instead of up to 8 MiB of tiles held by the cache between the
        # inference batches (memory that outlives a batch fragments the infer stage's heap)
        chunk = {
            "chunks": (1, t, t),
            "compression": "gzip",
            "compression_opts": 1,
            "rdcc_nbytes": 1,
        }
        tiles = f.create_dataset(
            "tiles", shape=(n, t, t), dtype=np.dtype(tile_dtype), **(chunk if n else {})
        )
        tiles.attrs["description"] = "tumour probability; cell (r, c) = map cell (by*T+r, bx*T+c)"
        f.create_dataset("grid_xy", data=grid.grid_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("level0_xy", data=grid.level0_xy.astype(np.int64).reshape(n, 2))
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        writer = TilesWriter(tiles, check)
        yield writer
        if writer.written != n:
            raise RuntimeError(f"{path}: {writer.written} of {n} tiles written")


@dataclass(frozen=True)
class TilesHeader:
    """What ``tiles.h5`` says about itself: attributes, geometry, size."""

    attrs: dict[str, Any]
    geometry: Geometry
    n_blocks: int

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def slide_wh(self) -> tuple[int, int]:
        return int(self.attrs["slide_width"]), int(self.attrs["slide_height"])

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp"])

    @property
    def model_checksum(self) -> str:
        return str(self.attrs["model_checksum"])


class TilesFile:
    """An open ``tiles.h5`` (see :func:`open_tiles`): header, block indices and tiles."""

    def __init__(self, f: Any, path: Path, header: TilesHeader, slide_id: str | None) -> None:
        self._f, self.path, self.header, self._slide_id = f, path, header, slide_id

    def _read(self, dataset: str, index: Any) -> np.ndarray:
        from ..faults import unreadable

        try:
            return self._f[dataset][index]
        except (OSError, KeyError, RuntimeError) as exc:
            raise unreadable(
                self.path, self._slide_id, "tiles file has unreadable data", exc, FORMAT
            )

    @property
    def grid_xy(self) -> np.ndarray:
        """(N, 2) int64 block indices ``(bx, by)``."""
        return self._read("grid_xy", ()).astype(np.int64).reshape(-1, 2)

    def tile(self, k: int, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """Tile ``k`` (its first ``rows`` x ``cols`` cells when given) as float32."""
        t = self.header.geometry.tile_side
        return self._read("tiles", np.s_[int(k), : rows or t, : cols or t]).astype(np.float32)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, tiles[start:start+size] as float32)`` over all tiles, in order."""
        for start in range(0, self.header.n_blocks, size):
            yield start, self._read("tiles", np.s_[start : start + size]).astype(np.float32)


@contextmanager
def open_tiles(path: str | Path, slide_id: str | None = None) -> Iterator[TilesFile]:
    """Open and check ``tiles.h5`` (:func:`read_tiles_header`); reads through :class:`TilesFile`."""
    import h5py

    header = read_tiles_header(path, slide_id)
    with h5py.File(path, "r") as f:
        yield TilesFile(f, Path(path), header, slide_id)


def read_tiles_header(path: str | Path, slide_id: str | None = None) -> TilesHeader:
    """Attributes and geometry of ``tiles.h5``, checked: the slide (when ``slide_id`` is given),
    the required attributes, the geometry and the dataset shapes. :class:`SlideError` naming the
    file when it is unusable (an unreadable file of the workflow's own is moved aside)."""
    import h5py

    from ..faults import unreadable

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "tiles file not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = h5_attrs(f)
            shapes = {k: f[k].shape for k in ("tiles", "grid_xy") if k in f}
    except (OSError, KeyError, RuntimeError) as exc:
        raise unreadable(path, slide_id, "tiles file is not a readable HDF5 file", exc, FORMAT)
    who = slide_id or attrs.get("slide_id")
    if attrs.get("format", FORMAT) != FORMAT:
        raise SlideError(who, path, f"not a wsiscan tiles file (format {attrs['format']!r})")
    if set(shapes) != {"tiles", "grid_xy"}:
        raise SlideError(who, path, "tiles file lacks the datasets tiles and grid_xy")
    if slide_id is not None and attrs.get("slide_id") != slide_id:
        raise SlideError(slide_id, path, f"tiles file belongs to slide {attrs.get('slide_id')!r}")
    missing = [
        k for k in ("slide_width", "slide_height", "mpp", "model_checksum") if k not in attrs
    ]
    if missing:
        raise SlideError(who, path, f"tiles file lacks attributes {missing}")
    try:
        geometry = Geometry.from_attrs(attrs)
    except (KeyError, ValueError) as exc:
        raise SlideError(who, path, f"tiles file geometry is invalid: {exc}")
    n, t = shapes["grid_xy"][0], geometry.tile_side
    if shapes["tiles"] != (n, t, t) or shapes["grid_xy"] != (n, 2):
        raise SlideError(
            who,
            path,
            f"tiles {shapes['tiles']} / grid_xy {shapes['grid_xy']} do not fit tile side {t}",
        )
    return TilesHeader(attrs=attrs, geometry=geometry, n_blocks=int(n))
