"""Tissue mask: Otsu threshold plus morphology on a low-resolution view of the slide; QC picture.

The mask is computed on the pyramid level nearest a target resolution (``target_mpp``, um/px), never
on a fixed level index. When that level is still much finer than the target (a single-level slide),
it is read in horizontal bands and block-averaged to about the target, so memory stays bounded.

Thresholding rule (:func:`segment_tissue`), on an RGB uint8 image whose pixels are ``mpp`` um wide:

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
4. Morphology with sizes in micrometres: closing with a disk of diameter ``closing_diameter_um`` (bridges
   gaps narrower than that), filling of holes smaller than ``hole_area_um2``, removal of pieces
   smaller than ``min_area_um2`` (dust, small debris). Pieces are 8-connected.

Neutral grey dust or ink brighter than ``dark_max_value`` is not saturated, so ``saturation`` and
``both`` ignore it; ``grey`` and ``either`` may keep it when it is large.

The stage (:func:`tissue_mask`) writes ``tissue.png`` (:mod:`wsiscan.formats.tissue_mask`) and a
QC picture, the thumbnail with the mask outline.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries
from skimage.transform import downscale_local_mean

from . import __version__
from .fileio import atomic_write
from .formats.tissue_mask import write_tissue_mask
from .params import TissueMaskParams
from .slide import Slide, open_slide

log = logging.getLogger(__name__)

QC_MAX_SIDE_PX = 1500
QC_MIN_SIDE_PX = 600
QC_OUTLINE_RGB = (0, 230, 0)
BAND_BYTES = 64 * 2**20  # RGB bytes read per band when block-averaging a fine level


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


def segment_tissue(
    rgb: np.ndarray, mpp: float, params: TissueMaskParams | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """Tissue mask of an RGB uint8 thumbnail whose pixels are ``mpp`` um wide, and what the
    thresholding found (Otsu thresholds, class contrasts, artefact share, closing radius in px).

    See the module docstring for the rule; ``params`` (default: the config defaults) gives the
    method, the morphology sizes in um and um^2, and the HSV / luminance floors (0-1). A blank
    image (no contrast) gives an all-False mask.
    """
    params = params or TissueMaskParams()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    p = params
    lo, hi = p.artefact_hue_range

    r, g, b = _channels(rgb)
    sat, value8 = _saturation_value(r, g, b)
    info: dict[str, float] = {}
    if p.artefact_filter:
        # hue only where it means something (coloured pixels): a fraction of the image
        coloured = np.flatnonzero(sat >= p.min_saturation)
        hue = _hue(r.ravel()[coloured], g.ravel()[coloured], b.ravel()[coloured])
        artefact = value8 < np.float32(p.dark_max_value * 255)
        artefact.ravel()[coloured[(hue >= lo) & (hue <= hi)]] = True
    else:
        artefact = np.zeros(sat.shape, dtype=bool)
    candidates = ~artefact
    info["artefact_fraction"] = float(artefact.mean()) if artefact.size else 0.0

    masks = []
    if p.method in ("saturation", "both", "either"):
        m, i = _otsu_foreground(sat, candidates, p.min_saturation, p.min_contrast)
        masks.append(m)
        info.update(saturation_threshold=i["threshold"], saturation_contrast=i["contrast"])
    if p.method in ("grey", "both", "either"):
        # darkness = 1 - luminance (weights of skimage.color.rgb2gray), in float32
        weights = (np.float32(0.2125 / 255), np.float32(0.7154 / 255), np.float32(0.0721 / 255))
        darkness = 1 - (r * weights[0] + g * weights[1] + b * weights[2])
        m, i = _otsu_foreground(darkness, candidates, p.min_darkness, p.min_contrast)
        masks.append(m)
        info.update(grey_threshold=i["threshold"], grey_contrast=i["contrast"])
    mask = masks[0]
    if p.method == "both":
        mask = masks[0] & masks[1]
    elif p.method == "either":
        mask = masks[0] | masks[1]

    radius_px = math.floor(p.closing_diameter_um / 2 / mpp + 0.5)
    if radius_px >= 1 and mask.any():
        footprint = morphology.disk(radius_px, decomposition="sequence")
        mask = morphology.closing(mask, footprint)
    px_area_um2 = mpp * mpp
    mask = _fill_small_holes(mask, int(math.ceil(p.hole_area_um2 / px_area_um2)), connectivity=1)
    mask = _remove_small_objects(mask, int(math.ceil(p.min_area_um2 / px_area_um2)), connectivity=2)
    info["closing_radius_px"] = float(radius_px)
    return mask.astype(bool, copy=False), info


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


# -- QC picture ----------------------------------------------------------------------------------
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


def write_qc_picture(path: str | Path, rgb: np.ndarray, mask: np.ndarray) -> None:
    """:func:`qc_picture` of ``rgb`` and ``mask`` as a PNG, atomically."""
    from PIL import Image

    with atomic_write(path) as fh:
        Image.fromarray(qc_picture(rgb, mask)).save(fh, format="PNG")


# -- stage -----------------------------------------------------------------------------------------
def tissue_mask(
    slide: str | Path,
    out_mask: str | Path,
    out_qc: str | Path,
    params: TissueMaskParams,
    *,
    slide_id: str,
) -> dict[str, object]:
    """Stage ``tissue_mask``: the slide's tissue mask (``tissue.png`` with its metadata) and the QC
    picture (thumbnail with the mask outline).

    The mask is computed at about ``params.target_mpp`` um/px (:func:`read_low_res`); the slide's
    level-0 resolution is resolved here, once (the file's, else ``params.mpp_fallback``), and
    recorded as ``slide_mpp`` for the later stages. Returns the metadata.
    """
    with open_slide(slide, slide_id=slide_id, mpp_fallback=params.mpp_fallback) as s:
        slide_mpp = s.mpp
        rgb, view = read_low_res(s, params.target_mpp)
        slide_w, slide_h = s.dimensions
    mask_mpp = slide_mpp * (float(view["downsample_x"]) + float(view["downsample_y"])) / 2
    mask, found = segment_tissue(rgb, mask_mpp, params)
    meta = mask_metadata(slide_id, view, mask, mask_mpp, slide_mpp, (slide_w, slide_h), params)
    meta.update({k: round(v, 6) for k, v in found.items()})
    write_tissue_mask(out_mask, mask, meta)
    write_qc_picture(out_qc, rgb, mask)
    log.info(
        "%s: tissue fraction %.4f (%d of %d mask px at %.3g um/px, level %d, reduce x%d, %s)",
        slide_id,
        meta["tissue_fraction"],
        int(mask.sum()),
        mask.size,
        mask_mpp,
        view["level"],
        view["reduce_factor"],
        params.method,
    )
    if not mask.any():
        log.warning("%s: no tissue found (blank slide or no contrast)", slide_id)
    return meta


def mask_metadata(
    slide_id: str,
    view: dict[str, Any],
    mask: np.ndarray,
    mask_mpp: float,
    slide_mpp: float,
    slide_wh: tuple[int, int],
    params: TissueMaskParams,
) -> dict[str, object]:
    """The text chunks of ``tissue.png``: how the mask maps to the slide, and its parameters."""
    meta: dict[str, object] = {
        "slide_id": slide_id,
        **view,
        "mask_mpp": mask_mpp,
        "slide_mpp": slide_mpp,
        "slide_width": int(slide_wh[0]),
        "slide_height": int(slide_wh[1]),
        "method": params.method,
        "tissue_fraction": float(mask.mean()),
        "wsiscan_version": __version__,
    }
    for name, value in params.settings().items():
        if name not in meta and name != "mpp_fallback":
            value = getattr(params, name)
            meta[name] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return meta
