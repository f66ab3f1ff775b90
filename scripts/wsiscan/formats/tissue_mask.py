"""``results/{slide}/tissue.png``: the tissue mask of a slide (written by ``tissue_mask``).

Layout: an 8-bit greyscale PNG, 255 = tissue, 0 = background. Mask pixel ``(i, j)`` covers level-0
pixels ``[j*downsample_x, (j+1)*downsample_x) x [i*downsample_y, (i+1)*downsample_y)`` from the
slide's top-left corner; the last row and column may reach past the slide. The metadata are PNG
text chunks: the keys of :data:`MASK_META_TYPES` (read back with those types) plus the mask
parameters and what the thresholding found (read back as strings). ``slide_mpp`` is the slide's
level-0 resolution as resolved by ``tissue_mask`` (the file's, or ``slide.mpp_fallback``): the
later stages take it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..fileio import atomic_write

#: Keys of the tissue.png text chunks and the type each is read back as.
MASK_META_TYPES: dict[str, type] = {
    "slide_id": str,
    "level": int,
    "level_downsample": float,
    "reduce_factor": int,
    "downsample_x": float,
    "downsample_y": float,
    "mask_mpp": float,
    "slide_mpp": float,
    "slide_width": int,
    "slide_height": int,
    "method": str,
    "tissue_fraction": float,
    "wsiscan_version": str,
}


def write_tissue_mask(path: str | Path, mask: np.ndarray, meta: dict[str, object]) -> None:
    """Write ``mask`` (bool) as a 0/255 PNG with ``meta`` as text chunks, atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    missing = [k for k in MASK_META_TYPES if k not in meta]
    if missing:
        raise ValueError(f"tissue mask metadata lacks {missing}")
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    with atomic_write(path) as fh:
        img.save(fh, format="PNG", pnginfo=info, optimize=True)


def read_tissue_mask(
    path: str | Path, slide_id: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``tissue.png``: ``(bool mask, metadata)``.

    Metadata values are typed (:data:`MASK_META_TYPES`); other keys are strings. Raises
    :class:`SlideError` (naming ``slide_id`` and the file) when the file is missing, not a PNG,
    lacks metadata, belongs to another slide or does not cover the slide it claims to.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "tissue mask not found")
    try:
        with Image.open(path) as img:
            img.load()
            text = dict(getattr(img, "text", {}) or {})
            arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SlideError(slide_id, path, f"tissue mask is not a readable PNG: {exc}")
    who = slide_id or text.get("slide_id")
    missing = [k for k in MASK_META_TYPES if k not in text]
    if missing:
        raise SlideError(who, path, f"tissue mask lacks metadata {', '.join(missing)}")
    meta: dict[str, Any] = dict(text)
    try:
        for key, typ in MASK_META_TYPES.items():
            meta[key] = typ(text[key])
    except ValueError as exc:
        raise SlideError(who, path, f"tissue mask metadata is malformed: {exc}")
    if slide_id is not None and meta["slide_id"] != slide_id:
        raise SlideError(slide_id, path, f"tissue mask belongs to slide {meta['slide_id']!r}")
    h, w = arr.shape
    for axis, n_px, ds, side in (
        ("x", w, meta["downsample_x"], meta["slide_width"]),
        ("y", h, meta["downsample_y"], meta["slide_height"]),
    ):
        covered = n_px * ds
        if not (side - 1e-6 * side <= covered < side + ds + 1e-6 * side):
            raise SlideError(
                who,
                path,
                f"tissue mask of {w}x{h} px at downsample_{axis} {ds} covers {covered:.1f} px, "
                f"not the slide's {side} px",
            )
    return arr > 127, meta


def check_mask_fits(meta: dict[str, Any], slide_wh: tuple[int, int], slide_id: str, path) -> None:
    """:class:`SlideError` unless the mask was made for a slide of ``slide_wh`` (level-0 px)."""
    if (meta["slide_width"], meta["slide_height"]) != tuple(slide_wh):
        raise SlideError(
            slide_id,
            path,
            f"tissue mask was made for a {meta['slide_width']}x{meta['slide_height']} px slide, "
            f"the slide is {slide_wh[0]}x{slide_wh[1]} px",
        )
