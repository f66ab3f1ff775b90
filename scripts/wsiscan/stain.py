"""Stain variation: HED augmentation (training) and Macenko stain normalisation (training and
inference).

Both work on optical density (OD, natural log): a pixel's OD is the sum of its stains' amounts
times their OD vectors (Beer-Lambert), so stain differences between labs are linear maps in OD.

**HED augmentation** (Tellez et al. 2018): the patch is unmixed into haematoxylin, eosin and a
residual (DAB) channel with scikit-image's colour deconvolution matrix (Ruifrok & Johnston,
``skimage.color.hed_from_rgb``), each channel ``c`` becomes ``c * alpha + beta`` (``alpha`` from
``1 +- scale``, ``beta`` from ``+- shift`` OD, per channel and patch), and the result is mixed back
(``skimage.color.rgb_from_hed``). Unlike ``skimage.color.rgb2hed`` the channels are not clipped at
zero, so zero strength gives back the patch exactly. A shift of the three channels is any constant
OD offset: it covers white-balance and brightness differences of scanners too.

**Macenko normalisation** (Macenko et al. 2009, torchstain's implementation): a slide's H and E
OD vectors and its 99th-percentile stain amounts are fitted once per slide on a sample of its
stained pixels (:func:`slide_stain_fit`: level-0 windows at random tissue positions of a thumbnail,
seeded by the slide ID), and every pixel of that slide is mapped to the training cohort's
reference stain (:func:`reference_fit`, fitted on all training slides and stored in ``model.pt``)
by one fixed linear map in OD (:class:`StainMap`). Because the map is per pixel and per slide (not
re-fitted per block or per patch), a normalised block equals the normalised patches it contains:
the FCN = patch classifier exactness carries over. The map runs where the pixels are read (the
loader workers of training, mining and inference), on uint8 in and out, so the network sees what a
normalised slide file would hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Transmitted light of the Macenko model (torchstain's default Io).
IO = 240.0
#: Pixels with an OD below this in any channel are glass (Macenko's beta).
OD_THRESHOLD = 0.15
#: Percentile of the angle range that gives the two stain vectors (Macenko's alpha).
ANGLE_PERCENTILE = 1.0
#: Sample of a slide for its fit: windows of WINDOW_PX level-0 pixels at tissue positions of a
#: thumbnail at THUMB_MPP um/px; at most FIT_PIXELS stained pixels enter the fit.
SAMPLE_WINDOWS = 32
WINDOW_PX = 256
THUMB_MPP = 8.0
FIT_PIXELS = 500_000
MIN_PIXELS = 2_000
#: Pixels of all training slides together in the reference fit (equal shares per slide).
REFERENCE_PIXELS = 2_000_000
METHODS = ("none", "macenko")


# == HED augmentation ==============================================================================
def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return hed_from_rgb.astype(np.float32), rgb_from_hed.astype(np.float32)


#: OD of each uint8 value for the augmentation: -log((v + 1) / 256), so 255 is OD 0.
_AUG_OD = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def draw_hed(rng: np.random.Generator, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel factors ``alpha`` from ``1 +- scale`` and offsets ``beta`` from ``+- shift``
    (OD) of the H, E and residual channels (always six draws, so later draws do not depend on
    the strength)."""
    alpha = 1.0 + rng.uniform(-scale, scale, 3)
    beta = rng.uniform(-shift, shift, 3)
    return alpha.astype(np.float32), beta.astype(np.float32)


def hed_perturb(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8, ``(..., 3)``) with its H, E and residual amounts ``c`` replaced by
    ``c * alpha + beta`` (OD units): a uint8 image of the same shape."""
    hed_from_rgb, rgb_from_hed = _hed_matrices()
    # row vectors: stains = od @ hed_from_rgb, od = stains @ rgb_from_hed
    matrix = (hed_from_rgb.astype(np.float64) * np.asarray(alpha, np.float64)) @ rgb_from_hed
    offset = np.asarray(beta, np.float64) @ rgb_from_hed.astype(np.float64)
    return apply_od_map(rgb, od_map_lut(matrix.T, offset, _AUG_OD, 256.0), subtract=1.0)


# == per-pixel maps in optical density ============================================================
def od_map_lut(
    matrix: np.ndarray, offset: np.ndarray, od_table: np.ndarray, light: float
) -> np.ndarray:
    """Look-up tables of the map ``OD' = matrix @ OD + offset`` followed by ``light *
    exp(-OD')``: ``lut[c, k, v] = exp(-matrix[c, k] * od_table[v])`` (float32, (3, 3, 256)) with
    ``light * exp(-offset[c])`` folded into ``k = 0``. ``od_table[v]`` is the OD of uint8 value
    ``v``."""
    matrix = np.asarray(matrix, np.float64)
    lut = np.exp(-matrix[:, :, None] * np.asarray(od_table, np.float64)[None, None, :])
    lut[:, 0, :] *= light * np.exp(-np.asarray(offset, np.float64))[:, None]
    return lut.astype(np.float32)


def apply_od_map(rgb: np.ndarray, lut: np.ndarray, subtract: float = 0.0) -> np.ndarray:
    """``rgb`` (uint8 ``(..., 3)``) through the tables of :func:`od_map_lut`: output channel ``c``
    is ``lut[c, 0, r] * lut[c, 1, g] * lut[c, 2, b] - subtract``, rounded and clipped to uint8.
    Nine look-ups and a few products per pixel, each pixel on its own (exact for any image size).
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    planes = [rgb[..., k] for k in range(3)]
    out = np.empty(rgb.shape, np.uint8)
    for c in range(3):
        value = np.take(lut[c, 0], planes[0])
        value *= np.take(lut[c, 1], planes[1])
        value *= np.take(lut[c, 2], planes[2])
        value += np.float32(0.5 - subtract)
        np.clip(value, np.float32(0.0), np.float32(255.0), out=value)
        out[..., c] = value.astype(np.uint8)
    return out


# == Macenko normalisation =========================================================================
#: uint8 value -> Macenko OD, -log((v + 1) / IO).
_NORM_OD = -np.log((np.arange(256, dtype=np.float64) + 1.0) / IO)


@dataclass(frozen=True)
class StainFit:
    """A Macenko fit: ``he_od`` (3, 2), the unit OD vectors of haematoxylin and eosin (columns,
    RGB rows), and ``max_conc`` (2,), their 99th-percentile amounts; ``n_pixels`` fitted on."""

    he_od: np.ndarray
    max_conc: np.ndarray
    n_pixels: int

    def as_dict(self) -> dict[str, Any]:
        """Plain types (checkpoint meta, JSON)."""
        return {
            "he_od": [[float(v) for v in row] for row in self.he_od],
            "max_conc": [float(v) for v in self.max_conc],
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def from_dict(cls, value: Any) -> StainFit:
        """The fit of :meth:`as_dict`; ``ValueError`` saying what is wrong otherwise."""
        if not isinstance(value, dict):
            raise ValueError(f"a stain fit is a mapping, got {type(value).__name__}")
        try:
            he = np.asarray(value["he_od"], dtype=np.float64)
            conc = np.asarray(value["max_conc"], dtype=np.float64)
            n = int(value.get("n_pixels", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a stain fit needs he_od (3x2) and max_conc (2): {exc}") from None
        if he.shape != (3, 2) or conc.shape != (2,):
            raise ValueError(f"stain fit shapes he_od {he.shape}, max_conc {conc.shape}")
        if not (np.isfinite(he).all() and np.isfinite(conc).all() and (conc > 0).all()):
            raise ValueError("stain fit holds non-finite or non-positive values")
        return cls(he, conc, n)


def stained_mask(rgb: np.ndarray) -> np.ndarray:
    """Where ``rgb`` (uint8, ``(..., 3)``) holds stain: OD at least :data:`OD_THRESHOLD` in every
    channel (Macenko's glass filter), and neither pen ink (the tissue mask's artefact hues) nor
    near black. Boolean, ``rgb.shape[:-1]``."""
    from .params import SETTINGS
    from .tissue import hsv_features

    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    if not len(px):
        return np.zeros(rgb.shape[:-1], dtype=bool)
    keep = _NORM_OD[px.max(axis=1)] >= OD_THRESHOLD  # the brightest channel has the lowest OD
    hue, sat, value = (a[0] for a in hsv_features(px[None]))
    lo, hi = SETTINGS["tissue.artefact_hue_range"].default
    ink = (sat >= SETTINGS["tissue.min_saturation"].default) & (hue >= lo) & (hue <= hi)
    ink |= value < SETTINGS["tissue.dark_max_value"].default
    return (keep & ~ink).reshape(rgb.shape[:-1])


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """The stained pixels of ``rgb`` (:func:`stained_mask`) as ``(N, 3)`` uint8."""
    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    return px[stained_mask(px)]


def macenko_fit(pixels: np.ndarray) -> StainFit:
    """Macenko fit (torchstain) of stained pixels ``(N, 3)`` uint8 (see :func:`stained_pixels`);
    ``ValueError`` with fewer than :data:`MIN_PIXELS`."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    px = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if len(px) < MIN_PIXELS:
        raise ValueError(f"{len(px)} stained pixels, at least {MIN_PIXELS} are needed")
    norm = NumpyMacenkoNormalizer()
    norm.fit(px.reshape(-1, 1, 3), Io=IO, alpha=ANGLE_PERCENTILE, beta=OD_THRESHOLD)
    fit = StainFit(
        np.asarray(norm.HERef, np.float64), np.asarray(norm.maxCRef, np.float64), len(px)
    )
    if not (np.isfinite(fit.he_od).all() and (fit.max_conc > 0).all()):
        raise ValueError("the fit found no two stains (a single colour?)")
    return fit


def slide_stain_sample(slide: Any, seed: int = 0) -> np.ndarray:
    """Stained pixels ``(N, 3)`` uint8 of an open :class:`wsiscan.slide.Slide`: up to
    :data:`SAMPLE_WINDOWS` level-0 windows of :data:`WINDOW_PX` px centred on random stained
    pixels of a :data:`THUMB_MPP` um/px thumbnail (seeded by ``seed`` and the slide ID), at most
    :data:`FIT_PIXELS` of them."""
    from .patches import stable_rng
    from .tissue import read_low_res

    thumb, info = read_low_res(slide, THUMB_MPP)
    rows, cols = np.nonzero(stained_mask(thumb))
    rng = stable_rng(seed, "stain-sample", slide.slide_id)
    if len(rows) == 0:
        return np.zeros((0, 3), np.uint8)
    pick = np.sort(rng.choice(len(rows), size=min(SAMPLE_WINDOWS, len(rows)), replace=False))
    w, h = slide.dimensions
    side = min(WINDOW_PX, w, h)
    parts = []
    for r, c in zip(rows[pick], cols[pick], strict=True):
        cx = (c + 0.5) * float(info["downsample_x"])
        cy = (r + 0.5) * float(info["downsample_y"])
        x0 = int(np.clip(round(cx) - side // 2, 0, w - side))
        y0 = int(np.clip(round(cy) - side // 2, 0, h - side))
        parts.append(stained_pixels(slide.read_rgb((x0, y0), 0, (side, side))))
    px = np.concatenate(parts)
    if len(px) > FIT_PIXELS:
        px = px[np.sort(rng.choice(len(px), size=FIT_PIXELS, replace=False))]
    return px


def slide_stain_fit(slide_path: str, slide_id: str, seed: int = 0) -> StainFit | None:
    """The Macenko fit of a slide (see :func:`slide_stain_sample`); None, with a warning, when
    the slide holds too little stained tissue to fit."""
    from .slide import open_slide

    with open_slide(slide_path, slide_id) as slide:
        px = slide_stain_sample(slide, seed)
    try:
        return macenko_fit(px)
    except ValueError as exc:
        log.warning("%s: no stain fit (%s): its pixels are not normalised", slide_id, exc)
        return None


def reference_fit(samples: list[np.ndarray]) -> StainFit:
    """The reference stain of a cohort: one Macenko fit of the pooled stained pixels of its
    slides (``samples``, one array per slide), each slide contributing at most an equal share of
    :data:`REFERENCE_PIXELS` (evenly spaced, so the result does not depend on a generator)."""
    share = max(MIN_PIXELS, REFERENCE_PIXELS // max(1, len(samples)))
    parts = []
    for px in samples:
        if len(px) > share:
            px = px[np.linspace(0, len(px) - 1, share).round().astype(np.int64)]
        parts.append(px)
    return macenko_fit(np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8))


class StainMap:
    """The per-pixel map of one slide's stain (``source``) onto ``reference`` (torchstain's
    Macenko formula with the slide-level fit): ``OD' = HE_ref diag(max_ref / max_src)
    pinv(HE_src) OD``, intensity ``IO exp(-OD')`` rounded to uint8.

    The 3x3 map is folded into look-up tables (:func:`od_map_lut`), so a pixel costs nine
    look-ups and a few products (no logarithm or exponential per pixel), the same for any image
    size: a block and the patches inside it are normalised identically. Picklable (DataLoader
    workers).
    """

    def __init__(self, source: StainFit, reference: StainFit) -> None:
        self.source, self.reference = source, reference
        scale = reference.max_conc / source.max_conc
        self.matrix = reference.he_od @ np.diag(scale) @ np.linalg.pinv(source.he_od)
        self._lut = od_map_lut(self.matrix, np.zeros(3), _NORM_OD, IO)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The normalised copy of ``rgb`` (uint8 ``(..., 3)``)."""
        return apply_od_map(rgb, self._lut)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source.as_dict(), "reference": self.reference.as_dict()}


def model_stain_map(model_path: str, slide_path: str, slide_id: str) -> StainMap | None:
    """The map of a slide onto the stain reference of the model at ``model_path``: None when the
    model was trained without normalisation (or the slide cannot be fitted, with a warning)."""
    from .formats.checkpoint import read_checkpoint_config, stain_reference

    reference = stain_reference(read_checkpoint_config(model_path), model_path)
    if reference is None:
        return None
    fit = slide_stain_fit(slide_path, slide_id)
    return StainMap(fit, reference) if fit is not None else None


def od_of(rgb: np.ndarray) -> np.ndarray:
    """Macenko optical density ``(N, 3)`` of the pixels of ``rgb`` (float64)."""
    return _NORM_OD[np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)]
