"""``results/{slide}/probmap.h5``: the slide's probability map and lesion mask (written by
``stitch``).

Layout (HDF5):

* ``prob`` float32 ``(ceil(H/Sd), ceil(W/Sd))``: map cell ``(i, j)`` covers level-0 pixels
  ``[j*Sd, (j+1)*Sd) x [i*Sd, (i+1)*Sd)`` and holds the tumour probability of the ``Lf`` patch
  centred on the cell centre; 0 where no block was scanned (no tissue);
* ``mask`` uint8, same shape: ``prob >= threshold``, then opened and closed (stitch settings);
* ``masked`` uint8, same shape: 1 where the confinement to tissue set a cell at or above the
  threshold to 0 (``prob`` itself is confined: 0 outside the dilated tissue mask);
* both chunked (strips of whole block rows x 512 columns), gzip level 1 with shuffle;
* attributes: ``format`` (:data:`FORMAT`), ``stride_px`` (= Sd, level-0 px per cell),
  ``origin_level0_xy`` (0, 0), ``level`` 0, ``downsample`` (= Sd), ``mpp`` (level-0 um/px),
  ``slide_width``, ``slide_height``, ``slide_id``, the geometry attributes and
  ``geometry_checksum``, ``model_checksum``, ``dense_mode``, ``threshold``, the stitch radii in um
  and in cells, ``confine_to_tissue``, ``tissue_margin_um``, ``masked_cells`` and
  ``masked_max_prob`` (what the confinement removed), ``n_tiles``, ``wsiscan_version``.

:func:`write_probmap` creates the datasets for the stitch stage to fill strip by strip;
:func:`read_probmap` and :func:`read_probmap_attrs` read it back, checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..fileio import atomic_h5, h5_attrs

FORMAT = "wsiscan-probmap/1"
REQUIRED_ATTRS = ("stride_px", "mpp", "slide_width", "slide_height")


@dataclass
class ProbMapOut:
    """The open datasets of a ``probmap.h5`` being written (see :func:`write_probmap`)."""

    prob: Any
    mask: Any
    masked: Any
    attrs: Any
    check: Any


@contextmanager
def write_probmap(
    path: str | Path, shape: tuple[int, int], strip_rows: int
) -> Iterator[ProbMapOut]:
    """Create ``probmap.h5`` with empty ``prob`` and ``mask`` of ``shape`` (rows, cols), chunked in
    strips of ``strip_rows``; the caller fills them and sets the attributes. Atomic."""
    rows, cols = shape
    with atomic_h5(path) as (f, check):
        opts = {
            "chunks": (max(1, min(strip_rows, rows)), max(1, min(512, cols))),
            "compression": "gzip",
            "compression_opts": 1,
            "shuffle": True,
        }
        prob = f.create_dataset("prob", shape=(rows, cols), dtype=np.float32, **opts)
        mask = f.create_dataset("mask", shape=(rows, cols), dtype=np.uint8, **opts)
        masked = f.create_dataset("masked", shape=(rows, cols), dtype=np.uint8, **opts)
        prob.attrs["description"] = (
            "tumour probability; cell (i, j) covers level-0 [j*s, (j+1)*s) x [i*s, (i+1)*s), "
            "s = stride_px"
        )
        mask.attrs["description"] = "prob >= threshold, opened then closed (disk radii)"
        masked.attrs["description"] = "cells >= threshold set to 0 outside the tissue"
        f.attrs["format"] = FORMAT
        yield ProbMapOut(prob=prob, mask=mask, masked=masked, attrs=f.attrs, check=check)


@dataclass
class ProbMap:
    """A slide's probability map and the attributes a later stage needs (level-0 units)."""

    prob: np.ndarray  # float32 (H, W)
    mask: np.ndarray | None  # bool (H, W): the stitch stage's thresholded + cleaned lesion mask
    stride_px: float
    mpp: float
    slide_width: int
    slide_height: int
    slide_id: str | None = None
    model_checksum: str | None = None
    wsiscan_version: str | None = None
    mask_threshold: float | None = None
    attrs: dict = field(default_factory=dict)


def read_probmap_attrs(path: str | Path, slide_id: str | None = None) -> dict[str, Any]:
    """The attributes of ``probmap.h5`` as plain values; checks the required ones and the ID.

    Raises :class:`SlideError` when the file is missing or unreadable, an attribute is missing,
    or the file belongs to another slide.
    """
    import h5py

    from ..faults import unreadable

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "probability map not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = h5_attrs(f)
    except (OSError, KeyError, RuntimeError) as exc:
        raise unreadable(path, slide_id, "probability map is not a readable HDF5 file", exc, FORMAT)
    if attrs.get("format", FORMAT) != FORMAT:
        raise SlideError(slide_id, path, f"not a wsiscan probability map ({attrs['format']!r})")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise SlideError(slide_id, path, f"probability map lacks attributes {missing}")
    if not (float(attrs["stride_px"]) > 0 and float(attrs["mpp"]) > 0):
        raise SlideError(
            slide_id, path, f"bad stride_px {attrs['stride_px']} or mpp {attrs['mpp']}"
        )
    if slide_id and attrs.get("slide_id") and attrs["slide_id"] != slide_id:
        raise SlideError(slide_id, path, f"probability map belongs to slide {attrs['slide_id']!r}")
    return attrs


def read_probmap(path: str | Path, slide_id: str | None = None) -> ProbMap:
    """Read ``prob`` (and ``mask`` when present) with their attributes from ``probmap.h5``."""
    import h5py

    from ..faults import unreadable

    path = Path(path)
    attrs = read_probmap_attrs(path, slide_id)
    try:
        with h5py.File(path, "r") as f:
            if "prob" not in f:
                raise SlideError(slide_id, path, "probability map has no 'prob' dataset")
            prob = np.asarray(f["prob"][...], dtype=np.float32)
            mask = np.asarray(f["mask"][...]).astype(bool) if "mask" in f else None
    except (OSError, KeyError, RuntimeError) as exc:
        raise unreadable(path, slide_id, "probability map has unreadable data", exc, FORMAT)
    if prob.ndim != 2 or (mask is not None and mask.shape != prob.shape):
        shapes = f"prob {prob.shape}" + (f", mask {mask.shape}" if mask is not None else "")
        raise SlideError(slide_id, path, f"bad map shapes: {shapes}")
    if not np.all(np.isfinite(prob)):
        raise SlideError(slide_id, path, "probability map holds NaN or infinite values")
    threshold = attrs.get("threshold")
    return ProbMap(
        prob=prob,
        mask=mask,
        stride_px=float(attrs["stride_px"]),
        mpp=float(attrs["mpp"]),
        slide_width=int(attrs["slide_width"]),
        slide_height=int(attrs["slide_height"]),
        slide_id=attrs.get("slide_id"),
        model_checksum=attrs.get("model_checksum"),
        wsiscan_version=attrs.get("wsiscan_version"),
        mask_threshold=float(threshold) if threshold is not None else None,
        attrs=attrs,
    )
