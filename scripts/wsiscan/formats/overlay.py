"""``results/{slide}/probmap.tif``: the probability map as a pyramidal tiled TIFF that slide viewers
open and lay over the slide (written by ``detect``; OpenSlide, QuPath and ASAP read it).

Layout:

* one TIFF page per pyramid level (level 0, then each level half the size of the one before, down
  to one tile), ``subfiletype`` 1 (reduced image) on every page after the first: the layout
  OpenSlide reads as a pyramid (a SubIFD pyramid is one level to OpenSlide 4);
* 256 x 256 px tiles, 8-bit grey (``minisblack``), zlib (deflate) compression, so lossless;
* pixel value ``round(255 * p)`` of the tumour probability ``p`` (0 = no tumour, 255 = 1);
* level-0 pixel ``(i, j)`` is map cell ``(i, j)`` of ``probmap.h5``: level-0 slide pixels
  ``[j*s, (j+1)*s) x [i*s, (i+1)*s)``, ``s = stride_px``. The map is cut to ``floor(W/s) x
  floor(H/s)`` cells (a partial last column or row, less than ``s`` slide pixels, is left out),
  so that the slide is exactly ``s`` times the overlay on both axes: ASAP scales an overlay by
  the integer ratio of the two sizes, which a rounded-up map would make ``s - 1``;
* resolution tags ``XResolution = YResolution = 10^4 / (mpp * s)`` pixels per centimetre,
  ``ResolutionUnit`` centimetre: OpenSlide reports ``openslide.mpp-x = mpp * s`` (the slide's
  mpp times the map stride) and QuPath takes the pixel size from them, so both place the overlay
  on the slide by its physical size;
* reduced levels hold the maximum of each 2 x 2 block of the level above: a small focus stays
  visible when the viewer zooms out;
* ``ImageDescription`` of level 0: a JSON object with ``format`` (:data:`FORMAT`), ``slide_id``,
  ``stride_px``, ``mpp`` (the slide's), ``overlay_mpp``, ``slide_width``, ``slide_height`` and
  ``value_scale`` (255).

:func:`write_overlay_tiff` writes it atomically; :func:`read_overlay_tiff` reads level 0 and its
description back, checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..fileio import atomic_write

FORMAT = "wsiscan-probmap-overlay/1"
TILE_PX = 256
VALUE_SCALE = 255


def overlay_shape(slide_wh: tuple[int, int], stride_px: float) -> tuple[int, int]:
    """``(rows, cols)`` of the overlay: ``floor(H/s), floor(W/s)`` (at least one cell)."""
    w, h = (int(v) for v in slide_wh)
    s = float(stride_px)
    return max(1, int(h // s)), max(1, int(w // s))


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """``round(255 * p)`` as uint8 (``p`` clipped to [0, 1])."""
    return np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * VALUE_SCALE).astype(
        np.uint8
    )


def pyramid(level0: np.ndarray, tile_px: int = TILE_PX) -> list[np.ndarray]:
    """Level 0 and its 2 x 2 maximum reductions until a level fits in one tile."""
    from skimage.measure import block_reduce

    levels = [level0]
    while max(levels[-1].shape) > tile_px:
        levels.append(block_reduce(levels[-1], (2, 2), np.max, cval=0).astype(np.uint8))
    return levels


def write_overlay_tiff(
    path: str | Path,
    prob: np.ndarray,
    *,
    stride_px: float,
    mpp: float,
    slide_wh: tuple[int, int],
    slide_id: str | None,
) -> dict[str, Any]:
    """Write the map ``prob`` (float, rows x cols cells of ``stride_px`` level-0 px of a slide
    of ``slide_wh`` px at ``mpp`` um/px) as the overlay TIFF (module layout); returns its
    description."""
    import tifffile

    rows, cols = overlay_shape(slide_wh, stride_px)
    cut = np.zeros((rows, cols), np.float32)
    src = np.asarray(prob)[:rows, :cols]
    cut[: src.shape[0], : src.shape[1]] = src
    overlay_mpp = float(mpp) * float(stride_px)
    description = {
        "format": FORMAT,
        "slide_id": slide_id,
        "stride_px": float(stride_px),
        "mpp": float(mpp),
        "overlay_mpp": overlay_mpp,
        "slide_width": int(slide_wh[0]),
        "slide_height": int(slide_wh[1]),
        "value_scale": VALUE_SCALE,
    }
    px_per_cm = 1e4 / overlay_mpp
    with atomic_write(path) as fh, tifffile.TiffWriter(fh, bigtiff=rows * cols > 2**31) as tif:
        for k, level in enumerate(pyramid(to_uint8(cut))):
            scale = 2**k
            tif.write(
                level,
                tile=(TILE_PX, TILE_PX),
                photometric="minisblack",
                compression="zlib",
                resolution=(px_per_cm / scale, px_per_cm / scale),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                description=json.dumps(description) if k == 0 else None,
                metadata=None,
            )
    return description


def read_overlay_tiff(
    path: str | Path, slide_id: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Level 0 (uint8) and the description of an overlay TIFF; :class:`SlideError` when the file
    is missing, unreadable, not an overlay or another slide's."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "overlay TIFF not found")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = json.loads(page.description or "{}")
            level0 = page.asarray()
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise SlideError(slide_id, path, f"not a readable overlay TIFF: {exc}")
    if description.get("format") != FORMAT:
        raise SlideError(slide_id, path, f"not a wsiscan overlay ({description.get('format')!r})")
    if slide_id and description.get("slide_id") not in (None, slide_id):
        raise SlideError(slide_id, path, f"overlay belongs to slide {description['slide_id']!r}")
    return level0, description
