"""Tissue mask: Otsu threshold plus morphology on a low-resolution view of the slide; QC picture.

The mask is computed on the pyramid level nearest a target resolution (``target_mpp``, um/px), never
on a fixed level index. When that level is still much finer than the target (a single-level slide),
it is read in horizontal bands and block-averaged to about the target, so memory stays bounded.

Thresholding rule (:func:`tissue_mask`), on an RGB uint8 image whose pixels are ``mpp`` um wide:

1. Artefacts are set aside first (``artefact_filter=True``): pixels whose HSV value is below
   ``dark_max_value`` (black ink, dirt, slide-edge shadows) and coloured pixels (saturation at least
   ``min_saturation``) whose HSV hue lies in ``artefact_hue_range`` -- by default 0.20-0.64, green
   through cyan to blue, the colours of marker pens that H&E (pink eosin 0.85-1.0/0-0.1, purple
   haematoxylin 0.7-0.85) never takes. They never count as tissue and are left out of the Otsu
   histogram. Red or purple ink cannot be told from H&E by colour and is not removed.
2. Feature: ``saturation`` = HSV saturation (default; robust to the brightness of the
   background), ``grey`` = darkness, ``1 - luminance``, ``both`` = tissue must pass the saturation
   AND the grey test (strict: drops grey dust and pale shadows), ``either`` = saturation OR grey
   (permissive: keeps very pale tissue).
3. Per feature, Otsu's threshold ``t`` over the candidate pixels. A pixel is tissue when its value
   exceeds ``max(t, floor)`` (floors ``min_saturation`` / ``min_darkness``: background is never
   tissue, whatever Otsu says). **Blank slides**: if the means of the two Otsu classes differ by
   less than ``min_contrast`` (feature units, 0-1), the image holds no contrast worth splitting
   (white or tinted glass with noise) and the feature gives no tissue at all, instead of half of
   the background.
4. Morphology with sizes in micrometres: closing with a disk of diameter ``closing_um`` (bridges
   gaps narrower than that), filling of holes smaller than ``hole_area_um2``, removal of pieces
   smaller than ``min_area_um2`` (dust, small debris). Pieces are 8-connected.

Neutral grey dust or ink brighter than ``dark_max_value`` is not saturated, so ``saturation`` and
``both`` ignore it; ``grey`` and ``either`` may keep it when it is large.

Files (:func:`compute_tissue_mask`): ``tissue.png`` (0/255, one pixel = ``downsample_x`` x
``downsample_y`` level-0 pixels from the slide's top-left corner; the last row/column may reach
past the slide) with its metadata as PNG text chunks (``MASK_META_TYPES`` and the parameters),
read back by :func:`read_tissue_mask`; and a QC picture, the thumbnail with the mask outline.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage as ndi
from skimage import morphology
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries
from skimage.transform import downscale_local_mean

from . import __version__
from .errors import SlideError
from .faults import atomic_file
from .slide import Slide, open_slide

log = logging.getLogger(__name__)

METHODS = ("saturation", "grey", "both", "either")

# Defaults chosen for Camelyon16 (0.243 um/px, mask at level 5 ~7.8 um/px) and the demo (~0.5 um/px).
DEFAULT_TARGET_MPP = 8.0
DEFAULT_CLOSING_UM = 50.0
DEFAULT_MIN_AREA_UM2 = 4_000.0  # ~63 x 63 um: drops dust, keeps small tissue fragments
DEFAULT_HOLE_AREA_UM2 = 50_000.0
DEFAULT_MIN_SATURATION = 0.05
DEFAULT_MIN_DARKNESS = 0.10
DEFAULT_MIN_CONTRAST = 0.05
DEFAULT_ARTEFACT_HUE_RANGE = (0.20, 0.64)
DEFAULT_DARK_MAX_VALUE = 0.15
QC_MAX_SIDE_PX = 1500
QC_MIN_SIDE_PX = 600
QC_OUTLINE_RGB = (0, 230, 0)
BAND_BYTES = 64 * 2**20  # RGB bytes read per band when block-averaging a fine level

# Keys of the tissue.png text chunks and the type each is read back as.
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


# -- pure mask computation -----------------------------------------------------------------------
def _hue(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) (float32) of uint8 channel arrays; 0 where the pixel is grey."""
    r, g, b = (c.astype(np.float32) for c in (r, g, b))
    value = np.maximum(np.maximum(r, g), b)
    delta = value - np.minimum(np.minimum(r, g), b)
    safe = np.where(delta > 0, delta, np.float32(1))
    hue = np.where(
        value == r,
        (g - b) / safe,
        np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = np.where(hue < 0, hue + 6, hue) / np.float32(6)
    return np.where(delta > 0, hue, np.float32(0)).astype(np.float32)


def _channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The R, G, B planes of an (H, W, 3) image as contiguous arrays."""
    return (
        np.ascontiguousarray(rgb[..., 0]),
        np.ascontiguousarray(rgb[..., 1]),
        np.ascontiguousarray(rgb[..., 2]),
    )


def hsv_features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV ``(hue, saturation, value)`` of an RGB uint8 image as float32 arrays in [0, 1].

    Same definition as :func:`skimage.color.rgb2hsv`, computed plane by plane in float32 (about
    10x faster on the multi-megapixel thumbnails of Camelyon-size slides).
    """
    r, g, b = _channels(rgb)
    sat, value8 = _saturation_value(r, g, b)
    return _hue(r, g, b), sat, value8.astype(np.float32) / np.float32(255)


def _saturation_value(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (float32, 0-1) and value (uint8, 0-255) of uint8 channel planes."""
    value8 = np.maximum(np.maximum(r, g), b)
    delta8 = value8 - np.minimum(np.minimum(r, g), b)
    sat = np.divide(delta8, value8, out=np.zeros(value8.shape, np.float32), where=value8 > 0)
    return sat, value8


def _otsu_foreground(
    feature: np.ndarray, candidates: np.ndarray, floor: float, min_contrast: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Pixels above Otsu's threshold (and ``floor``); none when the two classes barely differ."""
    empty = np.zeros(feature.shape, dtype=bool)
    values = feature[candidates]
    if values.size < 2 or values.min() == values.max():
        return empty, {"threshold": float("nan"), "contrast": 0.0}
    threshold = float(threshold_otsu(values))
    upper = values > threshold
    if upper.all() or not upper.any():
        return empty, {"threshold": threshold, "contrast": 0.0}
    contrast = float(values[upper].mean() - values[~upper].mean())
    info = {"threshold": threshold, "contrast": contrast}
    if contrast < min_contrast:
        return empty, info
    return candidates & (feature > max(threshold, floor)), info


def _remove_small_objects(mask: np.ndarray, min_px: int, connectivity: int) -> np.ndarray:
    """Drop connected pieces with fewer than ``min_px`` pixels (skimage >= 0.26 and older)."""
    if min_px <= 1:
        return mask
    if "max_size" in inspect.signature(morphology.remove_small_objects).parameters:
        return morphology.remove_small_objects(mask, max_size=min_px - 1, connectivity=connectivity)
    return morphology.remove_small_objects(mask, min_size=min_px, connectivity=connectivity)


def _fill_small_holes(mask: np.ndarray, max_hole_px: int, connectivity: int) -> np.ndarray:
    """Fill holes (background pieces) with fewer than ``max_hole_px`` pixels."""
    if max_hole_px <= 1:
        return mask
    if "max_size" in inspect.signature(morphology.remove_small_holes).parameters:
        return morphology.remove_small_holes(
            mask, max_size=max_hole_px - 1, connectivity=connectivity
        )
    return morphology.remove_small_holes(
        mask, area_threshold=max_hole_px, connectivity=connectivity
    )


def tissue_mask_details(
    rgb: np.ndarray,
    mpp: float,
    *,
    method: str = "saturation",
    closing_um: float = DEFAULT_CLOSING_UM,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    hole_area_um2: float = DEFAULT_HOLE_AREA_UM2,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    min_darkness: float = DEFAULT_MIN_DARKNESS,
    min_contrast: float = DEFAULT_MIN_CONTRAST,
    artefact_filter: bool = True,
    artefact_hue_range: tuple[float, float] = DEFAULT_ARTEFACT_HUE_RANGE,
    dark_max_value: float = DEFAULT_DARK_MAX_VALUE,
) -> tuple[np.ndarray, dict[str, float]]:
    """:func:`tissue_mask` plus a dict of what it found (thresholds, contrasts, artefact pixels)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    if method not in METHODS:
        raise ValueError(f"unknown tissue method {method!r}; choose one of {METHODS}")
    sizes = {"closing_um": closing_um, "min_area_um2": min_area_um2, "hole_area_um2": hole_area_um2}
    for name, v in sizes.items():
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    lo, hi = artefact_hue_range
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"artefact_hue_range must be 0 <= LO <= HI <= 1, got {artefact_hue_range}")

    r, g, b = _channels(rgb)
    sat, value8 = _saturation_value(r, g, b)
    info: dict[str, float] = {}
    if artefact_filter:
        # hue only where it means something (coloured pixels): a fraction of the image
        coloured = np.flatnonzero(sat >= min_saturation)
        hue = _hue(r.ravel()[coloured], g.ravel()[coloured], b.ravel()[coloured])
        artefact = value8 < np.float32(dark_max_value * 255)
        artefact.ravel()[coloured[(hue >= lo) & (hue <= hi)]] = True
    else:
        artefact = np.zeros(sat.shape, dtype=bool)
    candidates = ~artefact
    info["artefact_fraction"] = float(artefact.mean()) if artefact.size else 0.0

    masks = []
    if method in ("saturation", "both", "either"):
        m, i = _otsu_foreground(sat, candidates, min_saturation, min_contrast)
        masks.append(m)
        info.update(saturation_threshold=i["threshold"], saturation_contrast=i["contrast"])
    if method in ("grey", "both", "either"):
        # darkness = 1 - luminance (weights of skimage.color.rgb2gray), in float32
        weights = (np.float32(0.2125 / 255), np.float32(0.7154 / 255), np.float32(0.0721 / 255))
        darkness = 1 - (r * weights[0] + g * weights[1] + b * weights[2])
        m, i = _otsu_foreground(darkness, candidates, min_darkness, min_contrast)
        masks.append(m)
        info.update(grey_threshold=i["threshold"], grey_contrast=i["contrast"])
    mask = masks[0]
    if method == "both":
        mask = masks[0] & masks[1]
    elif method == "either":
        mask = masks[0] | masks[1]

    radius_px = math.floor(closing_um / 2 / mpp + 0.5)
    if radius_px >= 1 and mask.any():
        footprint = morphology.disk(radius_px, decomposition="sequence")
        mask = morphology.closing(mask, footprint)
    px_area_um2 = mpp * mpp
    mask = _fill_small_holes(mask, int(math.ceil(hole_area_um2 / px_area_um2)), connectivity=1)
    mask = _remove_small_objects(mask, int(math.ceil(min_area_um2 / px_area_um2)), connectivity=2)
    info["closing_radius_px"] = float(radius_px)
    return mask.astype(bool, copy=False), info


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    *,
    method: str = "saturation",
    closing_um: float = DEFAULT_CLOSING_UM,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    hole_area_um2: float = DEFAULT_HOLE_AREA_UM2,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    min_darkness: float = DEFAULT_MIN_DARKNESS,
    min_contrast: float = DEFAULT_MIN_CONTRAST,
    artefact_filter: bool = True,
    artefact_hue_range: tuple[float, float] = DEFAULT_ARTEFACT_HUE_RANGE,
    dark_max_value: float = DEFAULT_DARK_MAX_VALUE,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``mpp`` um wide.

    See the module docstring for the rule. Sizes: ``closing_um`` disk diameter (um),
    ``min_area_um2`` / ``hole_area_um2`` areas (um^2); ``min_saturation``, ``min_darkness``,
    ``min_contrast``, ``artefact_hue_range`` and ``dark_max_value`` are in HSV / luminance units
    (0-1). A blank image (no contrast) gives an all-False mask.
    """
    mask, _ = tissue_mask_details(
        rgb,
        mpp,
        method=method,
        closing_um=closing_um,
        min_area_um2=min_area_um2,
        hole_area_um2=hole_area_um2,
        min_saturation=min_saturation,
        min_darkness=min_darkness,
        min_contrast=min_contrast,
        artefact_filter=artefact_filter,
        artefact_hue_range=artefact_hue_range,
        dark_max_value=dark_max_value,
    )
    return mask


# -- reading the low-resolution view -------------------------------------------------------------
def read_low_res(
    slide: Slide, target_mpp: float, band_bytes: int = BAND_BYTES
) -> tuple[np.ndarray, dict[str, float | int]]:
    """The slide at about ``target_mpp`` um/px as RGB uint8, and how it maps to level 0.

    Reads the level nearest ``target_mpp``; when that level is at least 1.5x finer than the target
    it is block-averaged by an integer factor (read in bands of about ``band_bytes``; the last
    partial block is padded with white). Returns ``(rgb, info)`` with ``level``, ``level_downsample``,
    ``reduce_factor`` and ``downsample_x``/``downsample_y`` = level-0 pixels per output pixel.
    """
    if not target_mpp > 0:
        raise ValueError(f"target_mpp must be > 0, got {target_mpp}")
    level = slide.level_for_mpp(target_mpp)
    level_w, level_h = slide.level_dimensions[level]
    slide_w, slide_h = slide.dimensions
    ratio = target_mpp / slide.level_mpp(level)
    factor = max(1, math.floor(ratio + 0.5)) if ratio >= 1.5 else 1
    if factor == 1:
        rgb = slide.thumbnail(level)
    else:
        band_rows = factor * max(1, band_bytes // (3 * level_w) // factor)
        level_ds_y = slide_h / level_h
        starts = range(0, level_h, band_rows)
        parts = []
        bands = _progress(starts, desc=f"{slide.slide_id}: level {level} /{factor}")
        for y in bands:
            rows = min(band_rows, level_h - y)
            band = slide.read_rgb((0, int(round(y * level_ds_y))), level, (level_w, rows))
            parts.append(downscale_local_mean(band, (factor, factor, 1), cval=255))
        rgb = np.clip(np.rint(np.concatenate(parts, axis=0)), 0, 255).astype(np.uint8)
    info: dict[str, float | int] = {
        "level": level,
        "level_downsample": float(slide.level_downsamples[level]),
        "reduce_factor": factor,
        "downsample_x": slide_w / level_w * factor,
        "downsample_y": slide_h / level_h * factor,
    }
    return rgb, info


def _progress(items: range, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="band", file=sys.stderr, disable=len(items) < 4)


# -- files ---------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write to; on success replace ``path`` with it, else delete it.

    A write error is raised as :class:`wsiscan.faults.OutputWriteError` naming ``path``.
    """
    with atomic_file(path) as tmp:
        yield tmp


def write_tissue_mask(path: str | Path, mask: np.ndarray, meta: dict[str, object]) -> None:
    """Write ``mask`` as a 0/255 PNG with ``meta`` as text chunks, atomically."""
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info, optimize=True)


def read_tissue_mask(
    path: str | Path, slide_id: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a mask written by :func:`compute_tissue_mask`: ``(bool mask, metadata)``.

    Metadata values are typed (see ``MASK_META_TYPES``); unknown keys are returned as strings.
    Raises :class:`SlideError` (naming ``slide_id`` and the file) when the file is missing, not
    a PNG, lacks metadata or does not cover the slide it claims to.
    """
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
    slide_id = slide_id or text.get("slide_id")
    missing = [k for k in MASK_META_TYPES if k not in text]
    if missing:
        raise SlideError(slide_id, path, f"tissue mask lacks metadata {', '.join(missing)}")
    meta: dict[str, Any] = dict(text)
    try:
        for key, typ in MASK_META_TYPES.items():
            meta[key] = typ(text[key])
    except ValueError as exc:
        raise SlideError(slide_id, path, f"tissue mask metadata is malformed: {exc}")
    h, w = arr.shape
    for axis, n_px, ds, side in (
        ("x", w, meta["downsample_x"], meta["slide_width"]),
        ("y", h, meta["downsample_y"], meta["slide_height"]),
    ):
        covered = n_px * ds
        if not (side - 1e-6 * side <= covered < side + ds + 1e-6 * side):
            raise SlideError(
                slide_id,
                path,
                f"tissue mask of {w}x{h} px at downsample_{axis} {ds} covers {covered:.1f} px, "
                f"not the slide's {side} px",
            )
    return arr > 127, meta


def qc_picture(rgb: np.ndarray, mask: np.ndarray, max_side_px: int = QC_MAX_SIDE_PX) -> np.ndarray:
    """The thumbnail with the mask outline drawn (about 3 px thick) as RGB uint8.

    Large thumbnails are block-averaged to at most ``max_side_px``; small ones are enlarged by
    an integer factor (nearest neighbour, so mask pixels stay visible) to at least 600 px.
    """
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"thumbnail {rgb.shape[:2]} and mask {mask.shape} differ in size")
    side = max(mask.shape)
    if side > max_side_px:
        q = math.ceil(side / max_side_px)
        rgb = np.rint(downscale_local_mean(rgb, (q, q, 1), cval=255)).astype(np.uint8)
        mask = downscale_local_mean(mask.astype(np.float32), (q, q), cval=0) >= 0.5
    elif side < QC_MIN_SIDE_PX:
        k = min(math.ceil(QC_MIN_SIDE_PX / max(side, 1)), max_side_px // max(side, 1))
        if k > 1:
            rgb = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
            mask = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
    outline = find_boundaries(mask, mode="inner")
    outline = ndi.binary_dilation(outline, structure=morphology.disk(1).astype(bool))
    out = rgb.copy()
    out[outline] = QC_OUTLINE_RGB
    return out


def compute_tissue_mask(
    slide_path: str | Path,
    slide_id: str,
    out_mask_png: str | Path,
    out_qc_png: str | Path,
    *,
    target_mpp: float = DEFAULT_TARGET_MPP,
    mpp_fallback: float | None = None,
    method: str = "saturation",
    closing_um: float = DEFAULT_CLOSING_UM,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    hole_area_um2: float = DEFAULT_HOLE_AREA_UM2,
    min_saturation: float = DEFAULT_MIN_SATURATION,
    min_darkness: float = DEFAULT_MIN_DARKNESS,
    min_contrast: float = DEFAULT_MIN_CONTRAST,
    artefact_filter: bool = True,
    artefact_hue_range: tuple[float, float] = DEFAULT_ARTEFACT_HUE_RANGE,
    dark_max_value: float = DEFAULT_DARK_MAX_VALUE,
) -> dict[str, object]:
    """Stage ``tissue_mask``: the slide's tissue mask (PNG + metadata) and its QC picture.

    The mask is computed at about ``target_mpp`` um/px (see :func:`read_low_res`); its metadata
    (``MASK_META_TYPES`` plus the parameters) is stored as PNG text chunks and returned.
    """
    with open_slide(slide_path, slide_id=slide_id, mpp_fallback=mpp_fallback) as slide:
        rgb, view = read_low_res(slide, target_mpp)
        slide_w, slide_h = slide.dimensions
        slide_mpp = slide.mpp
    mask_mpp = slide_mpp * (float(view["downsample_x"]) + float(view["downsample_y"])) / 2
    mask, found = tissue_mask_details(
        rgb,
        mask_mpp,
        method=method,
        closing_um=closing_um,
        min_area_um2=min_area_um2,
        hole_area_um2=hole_area_um2,
        min_saturation=min_saturation,
        min_darkness=min_darkness,
        min_contrast=min_contrast,
        artefact_filter=artefact_filter,
        artefact_hue_range=artefact_hue_range,
        dark_max_value=dark_max_value,
    )
    fraction = float(mask.mean())
    meta: dict[str, object] = {
        "slide_id": slide_id,
        **view,
        "mask_mpp": mask_mpp,
        "slide_mpp": slide_mpp,
        "slide_width": slide_w,
        "slide_height": slide_h,
        "method": method,
        "tissue_fraction": fraction,
        "wsiscan_version": __version__,
        "closing_um": closing_um,
        "min_area_um2": min_area_um2,
        "hole_area_um2": hole_area_um2,
        "min_saturation": min_saturation,
        "min_darkness": min_darkness,
        "min_contrast": min_contrast,
        "artefact_filter": artefact_filter,
        "artefact_hue_range": f"{artefact_hue_range[0]},{artefact_hue_range[1]}",
        "dark_max_value": dark_max_value,
        **{k: round(v, 6) for k, v in found.items()},
    }
    write_tissue_mask(out_mask_png, mask, meta)
    with atomic_path(out_qc_png) as tmp:
        Image.fromarray(qc_picture(rgb, mask)).save(tmp, format="PNG")
    log.info(
        "%s: tissue fraction %.4f (%d of %d mask px at %.3g um/px, level %d, reduce x%d, %s)",
        slide_id,
        fraction,
        int(mask.sum()),
        mask.size,
        mask_mpp,
        view["level"],
        view["reduce_factor"],
        method,
    )
    if fraction == 0:
        log.warning("%s: no tissue found (blank slide or no contrast)", slide_id)
    return meta
