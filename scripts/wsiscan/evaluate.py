"""Cohort evaluation by the Camelyon16 protocol: lesion FROC, slide ROC/AUC, bootstrap CIs, plots.

The FROC reproduces the official Camelyon16 ``Evaluation_FROC.py`` (Bejnordi, 2016) number for
number by default, including its quirks; each is documented where it is reproduced:

* the evaluation mask is built at downsample 32 (level 5 of the Camelyon16 pyramids): Euclidean
  distance of every non-tumour pixel to the nearest tumour pixel, keep ``distance < 75 um /
  (mpp * 32 * 2)`` px (the threshold is *half* the 75 um, i.e. 37.5 um, measured in level-5 px),
  fill holes, label 8-connected regions (:func:`evaluation_mask`);
* an isolated-tumour-cell (ITC) region is a labelled region whose ``regionprops`` major axis is
  ``< 275 um / (mpp * 32)`` px (:func:`itc_labels`);
* a detection at level-0 ``(X, Y)`` hits ``mask[Y // 32, X // 32]`` (row Y, column X; integer
  division as in the Python 2 original); label 0: false positive; ITC label: ignored; other: the
  lesion's true-positive probability becomes the hit's confidence if higher (so only the
  highest-confidence hit counts, further hits are neither TP nor FP) (:func:`match_detections`);
* the per-lesion TP array is float32 and starts at zeros for *every* label, ITC labels included
  (they stay 0); every detection on a normal slide is a false positive;
* thresholds are the sorted unique values of all FP and TP probabilities (zeros of missed lesions
  included) *without the lowest one*; a final ``(0 FP, 0 sensitivity)`` point is appended; because
  the TP array is float32, TP probabilities are compared with the threshold in float32 (NumPy casts
  a Python-float threshold to the float32 array's type), FP probabilities in float64; the unique
  set and its order are taken in float64, as on the NumPy 1 the script ran on, where a float32
  scalar and a Python float compare in float64 (:func:`froc_curve`);
* FP per slide = #FP >= t / number of evaluated slides; sensitivity = #TP >= t / number of non-ITC
  lesions; FROC score = mean of ``np.interp`` at 0.25, 0.5, 1, 2, 4, 8 FP per slide over the
  reversed curve (constant beyond its ends) (:func:`froc_score`).

Ground truth: a mask TIFF is read as the script reads it: OpenSlide's level of downsample 32 (level
5 of the Camelyon16 masks), whole and as it is, so cell ``(r, c)`` is that level's pixel ``(r, c)``
whatever the slide's size; sides that are not multiples of 32 included (OpenSlide's
``level_downsamples``, averaged over x and y, would shift the cells) (:func:`tumour_mask_from_tiff`).
Polygons (ASAP XML, QuPath GeoJSON) are rasterised at downsample 32 with cell centres inside, the
groups ``annotation.tumour_groups`` minus ``annotation.exclusion_groups``.

Deviations, where the official script has no answer: physical thresholds use each slide's own mpp
(the script hard-codes 0.243 um/px); a detection outside the mask (the script crashes, or wraps
around for negative coordinates; a mask level rounded down ends before the slide does) is a false
positive, with a warning; slide labels come from the sample sheet (the script guesses them from the
file name); a ground-truth mask TIFF counts every non-zero pixel as tumour (the script needs exactly
255, identical on the binary Camelyon16 masks); a mask without a downsample-32 level is sampled at
the cell centres of its nearest level. Ground truth that would silently be wrong is an error naming
the slide and the file: a tumour slide whose annotation yields no tumour polygon (or a mask without
a tumour pixel), a TIFF that is not a label mask (the slide itself, say) or not the slide's size, a
vertex that cannot be a pixel of the slide (farther outside it than its own size). A tumour slide
whose tumour polygons are all too small to cover a cell centre gets an empty evaluation mask (with
a warning).

Known variants (config switches): ``fp_on_negative_only`` (FPs counted on normal slides only, over
the number of normal slides) and ``interpolation: nearest`` (no interpolation: the best operating
point at or below each FP rate).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .annotations import DEFAULT_GROUPS, AnnotationGroups
from .errors import ConfigError, SlideError
from .faults import describe_failure, failed_slides, failure_record_path, read_failure_record
from .fileio import atomic_dir, atomic_write, sha256_file, write_json
from .formats.lesions import read_lesions_csv, read_score_json, write_lesions_csv
from .formats.probmap import read_probmap_attrs
from .params import EvaluateParams, RoundSummaryParams

log = logging.getLogger(__name__)

EVAL_DOWNSAMPLE = 32  #: level 5 of the Camelyon16 pyramids
GROWTH_UM = 75.0  #: annotations grow by (half of) 75 um, the size of ~5 tumour cells
ITC_MAJOR_AXIS_UM = 275.0  #: 200 um ITC limit + 75 um growth
FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  #: FP per slide at which sensitivity is averaged
INTERPOLATIONS = ("linear", "nearest")
LABELS = ("tumor", "normal")
#: cause listed for a slide left out as failed whose failure record is gone by evaluation time
RERUN_SINCE = (
    "its per-slide job had failed when this run was planned and was re-run since: "
    "run the workflow again to evaluate it"
)
#: a mask TIFF level read whole must fit in this many RGBA bytes
MAX_MASK_LEVEL_BYTES = 1 << 30
#: a ground-truth mask holds at most this many distinct values ...
MASK_MAX_VALUES = 16
#: ... or (levels averaged from a binary mask) values other than its two main ones on this share
MASK_MAX_MIXED = 0.05


# -- evaluation mask -------------------------------------------------------------------------------
def eval_mask_shape(
    slide_wh: tuple[int, int], downsample: int = EVAL_DOWNSAMPLE
) -> tuple[int, int]:
    """``(rows, cols)`` of the evaluation mask: ``ceil(h / ds), ceil(w / ds)``.

    Ceil, so every level-0 pixel of the slide maps into the mask.
    """
    w, h = (int(v) for v in slide_wh)
    return -(-h // downsample), -(-w // downsample)


def evaluation_mask(
    tumour: np.ndarray, mpp: float, downsample: int = EVAL_DOWNSAMPLE
) -> np.ndarray:
    """Labelled evaluation mask (int32, 0 = background) from a tumour mask at ``downsample``.

    As the official script: ``distance_transform_edt`` of the non-tumour pixels, keep
    ``distance < 75 / (mpp * downsample * 2)`` px, ``binary_fill_holes``, label with
    8-connectivity. ``mpp`` is the slide's level-0 um/px. A mask without tumour gives all zeros.
    """
    from scipy import ndimage
    from skimage.measure import label

    tumour = np.asarray(tumour, dtype=bool)
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32)
    distance_px = ndimage.distance_transform_edt(~tumour)
    grown = distance_px < GROWTH_UM / (mpp * downsample * 2)
    filled = ndimage.binary_fill_holes(grown)
    return label(filled, connectivity=2).astype(np.int32)


def itc_labels(labels: np.ndarray, mpp: float, downsample: int = EVAL_DOWNSAMPLE) -> np.ndarray:
    """Sorted labels of the ITC regions: ``regionprops`` major axis ``< 275 / (mpp * ds)`` px."""
    from skimage.measure import regionprops

    limit_px = ITC_MAJOR_AXIS_UM / (mpp * downsample)
    itc = [rp.label for rp in regionprops(labels) if rp.axis_major_length < limit_px]
    return np.asarray(sorted(itc), dtype=np.int64)


def tumour_mask_from_annotation(
    path: str | Path,
    slide_wh: tuple[int, int],
    *,
    slide_id: str | None = None,
    groups: AnnotationGroups = DEFAULT_GROUPS,
    downsample: int = EVAL_DOWNSAMPLE,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Tumour mask (bool) of a tumour slide from its annotation: polygons or a mask TIFF.

    ASAP XML (``.xml``) or QuPath GeoJSON (``.geojson``, ``.json``): the ``groups.tumour`` polygons
    minus the ``groups.exclusion`` ones (:func:`wsiscan.annotations.read_slide_annotations`, which
    refuses a file without a tumour polygon and coordinates that cannot be pixels of the slide),
    rasterised at ``downsample`` (:func:`eval_mask_shape`) by
    :func:`wsiscan.annotations.rasterize`; polygons entirely outside the slide are reported
    through ``warn`` (default: the log) and contribute nothing. Anything else: a Camelyon16
    ground-truth mask TIFF (:func:`tumour_mask_from_tiff`).
    """
    from .annotations import ASAP_SUFFIXES, GEOJSON_SUFFIXES, rasterize, read_slide_annotations

    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "annotation file not found")
    if path.suffix.lower() not in ASAP_SUFFIXES + GEOJSON_SUFFIXES:
        return tumour_mask_from_tiff(path, slide_wh, slide_id=slide_id, downsample=downsample)
    anns = read_slide_annotations(
        path, slide_wh, slide_id=slide_id, groups=groups, tumour_slide=True, warn=warn
    )
    mask = np.asarray(rasterize(anns, eval_mask_shape(slide_wh, downsample), downsample, groups))
    if not mask.any():
        (warn or log.warning)(
            f"slide {slide_id}: the tumour annotation {path} covers no pixel of the slide at "
            f"downsample {downsample}"
        )
    return mask.astype(bool)


def _exact_downsample(size0: int, size: int) -> float:
    """A level's downsample along one axis: ``2**k`` when its size is ``size0 / 2**k`` rounded
    either way (as pyramid writers make it), else ``size0 / size``."""
    for k in range(32):
        if size in (size0 >> k, -(-size0 >> k)):
            return float(1 << k)
    return size0 / size


def mask_level(
    level_dimensions: Sequence[tuple[int, int]], downsample: int = EVAL_DOWNSAMPLE
) -> int | None:
    """The pyramid level whose size is level 0's divided by ``downsample`` (rounded either way,
    on both axes): level 5 of the Camelyon16 masks for 32. None when there is none."""
    (w, h), ds = level_dimensions[0], int(downsample)
    for k, (lw, lh) in enumerate(level_dimensions):
        if lw in (w // ds, -(-w // ds)) and lh in (h // ds, -(-h // ds)):
            return k
    return None


def check_label_image(rgba: np.ndarray, path: Path, slide_id: str | None, level: int) -> np.ndarray:
    """The grey values (uint8) of a mask level read as RGBA; :class:`SlideError` unless it looks
    like a label mask: one channel (R = G = B, so not the slide itself or another colour image)
    holding at most :data:`MASK_MAX_VALUES` distinct values, or (a pyramid whose levels were
    averaged) values other than the two most common on at most :data:`MASK_MAX_MIXED` of it."""
    grey = rgba[..., 0]
    if not (np.array_equal(grey, rgba[..., 1]) and np.array_equal(grey, rgba[..., 2])):
        raise SlideError(
            slide_id,
            path,
            f"not a ground-truth mask: level {level} is a colour image (its channels differ), "
            "not a single-channel label mask; is it the slide itself?",
        )
    counts = np.bincount(grey.reshape(-1), minlength=256)
    n_values = int(np.count_nonzero(counts))
    mixed = 1.0 - np.sort(counts)[-2:].sum() / max(grey.size, 1)
    if n_values > MASK_MAX_VALUES and mixed > MASK_MAX_MIXED:
        raise SlideError(
            slide_id,
            path,
            f"not a ground-truth mask: level {level} holds {n_values} distinct grey values, "
            f"{mixed:.0%} of its pixels outside the two most common (a mask holds a few label "
            "values, such as 0 and 255)",
        )
    return grey


def tumour_mask_from_tiff(
    path: str | Path,
    slide_wh: tuple[int, int],
    *,
    slide_id: str | None = None,
    downsample: int = EVAL_DOWNSAMPLE,
    tumour_slide: bool = True,
) -> np.ndarray:
    """Tumour mask (bool) from a ground-truth mask TIFF, read through OpenSlide as the official
    script reads it.

    The level of downsample ``downsample`` (:func:`mask_level`; level 5 of the Camelyon16 masks)
    is used as it is: evaluation cell ``(r, c)`` is its pixel ``(r, c)``, the official
    ``mask[Y / 2**5, X / 2**5]``, whatever the level-0 size (OpenSlide's ``level_downsamples``,
    averaged over x and y, are not used), and the mask has that level's shape (a level rounded
    down ends a cell short: detections in the last partial cell lie outside). A mask without such
    a level is sampled at the centre of every cell of :func:`eval_mask_shape` in its nearest level,
    by that level's own downsample per axis (no official answer there; logged). Tumour =
    non-zero and not transparent.

    :class:`SlideError` when the file cannot be read, its level-0 size is not the slide's, the
    level read is not a label mask (:func:`check_label_image`) or, ``tumour_slide``, it holds no
    tumour pixel.
    """
    import openslide

    path = Path(path)
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise SlideError(slide_id, path, f"cannot open ground-truth mask: {exc}")
    with osr:
        dims = [tuple(int(v) for v in d) for d in osr.level_dimensions]
        (mask_w, mask_h), (w, h) = dims[0], (int(slide_wh[0]), int(slide_wh[1]))
        if (mask_w, mask_h) != (w, h):
            raise SlideError(
                slide_id,
                path,
                f"the mask is {mask_w}x{mask_h} px, the slide {w}x{h} px: a ground-truth mask "
                "has the size of its slide (another slide's mask?)",
            )
        level = mask_level(dims, downsample)
        exact = level is not None
        if level is None:
            ds = np.asarray(osr.level_downsamples, dtype=np.float64)
            level = int(np.argmin(np.abs(np.log(ds / downsample))))
        lw, lh = dims[level]
        if lw * lh * 4 > MAX_MASK_LEVEL_BYTES:
            raise SlideError(
                slide_id,
                path,
                f"mask has no pyramid level near downsample {downsample} small enough to read "
                f"(nearest: level {level}, {lw}x{lh} px); write the mask as a pyramid",
            )
        try:
            rgba = np.asarray(osr.read_region((0, 0), level, (lw, lh)))
        except openslide.OpenSlideError as exc:
            raise SlideError(slide_id, path, f"cannot read ground-truth mask: {exc}")
    grey = check_label_image(rgba, path, slide_id, level)
    tumour_level = (grey > 0) & (rgba[..., 3] > 0)
    if exact:
        tumour = tumour_level
    else:
        log.warning(
            "slide %s: mask %s has no level of downsample %d; sampling level %d (%dx%d px) at the "
            "cell centres",
            slide_id, path, downsample, level, lw, lh,
        )  # fmt: skip
        rows, cols = eval_mask_shape((w, h), downsample)
        ds_x, ds_y = _exact_downsample(w, lw), _exact_downsample(h, lh)
        src_r = np.clip(np.floor((np.arange(rows) + 0.5) * downsample / ds_y), 0, lh - 1)
        src_c = np.clip(np.floor((np.arange(cols) + 0.5) * downsample / ds_x), 0, lw - 1)
        tumour = tumour_level[np.ix_(src_r.astype(np.int64), src_c.astype(np.int64))]
    if tumour_slide and not tumour.any():
        raise SlideError(
            slide_id,
            path,
            f"tumour slide without a tumour annotation: the mask holds no tumour (non-zero) "
            f"pixel at downsample {downsample}",
        )
    return tumour


# -- matching detections ---------------------------------------------------------------------------
@dataclass
class SlideFROC:
    """A slide's contribution to the FROC, as the official ``compute_FP_TP_Probs`` returns it.

    ``tp_probs`` is float32 with one entry per label of the evaluation mask (ITC labels and missed
    lesions 0); ``n_lesions`` counts the non-ITC labels.
    """

    slide_id: str
    is_tumour: bool
    fp_probs: np.ndarray  # float64 (n_fp,)
    tp_probs: np.ndarray  # float32 (max_label,)
    n_lesions: int
    n_itc: int
    n_detections: int
    itc_hits: int
    outside: int  # detections outside the evaluation mask (counted as FP)

    @property
    def tp(self) -> int:
        """Non-ITC lesions hit by at least one detection with positive confidence."""
        return int(np.count_nonzero(self.tp_probs > 0))

    @property
    def fp(self) -> int:
        return int(self.fp_probs.size)


def match_detections(
    slide_id: str,
    confidence: np.ndarray,
    level0_xy: np.ndarray,
    labels: np.ndarray | None,
    itc: np.ndarray,
    *,
    is_tumour: bool,
    downsample: int = EVAL_DOWNSAMPLE,
) -> SlideFROC:
    """Split one slide's detections into FPs, per-lesion TP probabilities and ignored ITC hits.

    ``confidence`` (K,), ``level0_xy`` (K, 2) int level-0 px; ``labels`` the evaluation mask
    (ignored for a normal slide, where every detection is a FP). A detection hits
    ``labels[y // ds, x // ds]``; outside the mask it is a FP (with a warning).
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    xy = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
    itc = np.asarray(itc, dtype=np.int64)
    if not is_tumour or labels is None:
        return SlideFROC(
            slide_id, False, conf.copy(), np.zeros(0, np.float32), 0, 0, conf.size, 0, 0
        )
    max_label = int(labels.max()) if labels.size else 0
    rows, cols = xy[:, 1] // downsample, xy[:, 0] // downsample
    inside = (rows >= 0) & (rows < labels.shape[0]) & (cols >= 0) & (cols < labels.shape[1])
    hit = np.zeros(conf.size, dtype=np.int64)
    hit[inside] = labels[rows[inside], cols[inside]]
    n_out = int(np.count_nonzero(~inside))
    if n_out:
        log.warning(
            "slide %s: %d detections outside the evaluation mask (the slide, or a mask level "
            "rounded down) count as FP",
            slide_id,
            n_out,
        )
    on_itc = np.isin(hit, itc) & (hit > 0)
    on_lesion = (hit > 0) & ~on_itc
    best = np.zeros(max_label, dtype=np.float64)
    np.maximum.at(best, hit[on_lesion] - 1, conf[on_lesion])
    return SlideFROC(
        slide_id=slide_id,
        is_tumour=True,
        fp_probs=conf[hit == 0].copy(),
        # float32 as the official TP array; max-then-round == the script's compare-and-store
        tp_probs=best.astype(np.float32),
        n_lesions=max_label - int(itc.size),
        n_itc=int(itc.size),
        n_detections=int(conf.size),
        itc_hits=int(np.count_nonzero(on_itc)),
        outside=n_out,
    )


# -- FROC ------------------------------------------------------------------------------------------
def froc_curve(
    fp_probs: np.ndarray, tp_probs: np.ndarray, n_slides: int, n_lesions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official FROC curve: ``(fp_per_slide, sensitivity, threshold)``, thresholds ascending.

    ``fp_probs`` all FP confidences (float64), ``tp_probs`` all per-lesion TP probabilities
    (float32, zeros included), ``n_slides`` the FP-rate denominator, ``n_lesions`` the number of
    non-ITC lesions. Thresholds: sorted unique of both, the lowest skipped; last point ``(0, 0)``
    with threshold ``inf``. TPs are compared in float32 (official quirk), FPs in float64.
    """
    if n_slides <= 0 or n_lesions <= 0:
        raise ValueError(f"FROC needs slides and lesions (got {n_slides}, {n_lesions})")
    fp = np.sort(np.asarray(fp_probs, dtype=np.float64).reshape(-1))
    tp = np.sort(np.asarray(tp_probs, dtype=np.float32).reshape(-1))
    thresholds = np.unique(np.concatenate([fp, tp.astype(np.float64)]))[1:]
    fp_counts = fp.size - np.searchsorted(fp, thresholds, side="left")
    tp_counts = tp.size - np.searchsorted(tp, thresholds.astype(np.float32), side="left")
    fps = np.append(fp_counts, 0) / float(n_slides)
    sens = np.append(tp_counts, 0) / float(n_lesions)
    return fps, sens, np.append(thresholds, np.inf)


def froc_score(
    fp_per_slide: np.ndarray,
    sensitivity: np.ndarray,
    *,
    rates: tuple[float, ...] = FROC_RATES,
    interpolation: str = "linear",
) -> tuple[float, np.ndarray]:
    """FROC score and the sensitivities at ``rates`` FP per slide.

    ``linear`` (official): ``np.interp(rates, fps[::-1], sens[::-1])`` on the curve of
    :func:`froc_curve` (sensitivity held constant beyond the curve's ends). ``nearest``: the
    highest sensitivity among the curve points with ``fps <= rate`` (no interpolation).
    """
    fps = np.asarray(fp_per_slide, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    if interpolation == "linear":
        at = np.interp(r, fps[::-1], sens[::-1])
    elif interpolation == "nearest":
        at = np.array([sens[fps <= x].max(initial=0.0) for x in r])
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return float(np.mean(at)), at


def cohort_froc_inputs(
    slides: list[SlideFROC], *, fp_on_negative_only: bool = False
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(fp_probs, tp_probs, n_slides, n_lesions)`` of a cohort for :func:`froc_curve`.

    Official: FPs of every slide over the number of slides. ``fp_on_negative_only``: FPs of the
    normal slides only, over the number of normal slides.
    """
    fp_src = [s for s in slides if not (fp_on_negative_only and s.is_tumour)]
    fp = np.concatenate([s.fp_probs for s in fp_src] + [np.zeros(0)])
    tp = np.concatenate([s.tp_probs for s in slides] + [np.zeros(0, np.float32)])
    return fp, tp.astype(np.float32), len(fp_src), sum(s.n_lesions for s in slides)


def cohort_froc(
    slides: list[SlideFROC],
    *,
    fp_on_negative_only: bool = False,
    interpolation: str = "linear",
) -> dict | None:
    """FROC curve and score of a cohort; ``None`` when undefined (no lesions or no FP slides)."""
    fp, tp, n_slides, n_lesions = cohort_froc_inputs(
        slides, fp_on_negative_only=fp_on_negative_only
    )
    if n_slides == 0 or n_lesions == 0:
        return None
    fps, sens, thr = froc_curve(fp, tp, n_slides, n_lesions)
    score, at = froc_score(fps, sens, interpolation=interpolation)
    return {"fps": fps, "sensitivity": sens, "thresholds": thr, "score": score, "at": at}


# -- AUC and bootstrap -----------------------------------------------------------------------------
def slide_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (``sklearn.metrics.roc_auc_score``; tumour = 1); ``None`` with one class only."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    if np.unique(labels).size < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def _ci(values: list[float]) -> list[float] | None:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None


def bootstrap_cis(
    labels: np.ndarray,
    scores: np.ndarray,
    froc_slides: list[SlideFROC],
    *,
    n: int,
    seed: int,
    fp_on_negative_only: bool = False,
    interpolation: str = "linear",
) -> dict:
    """95% percentile CIs of AUC and FROC score from ``n`` resamples of slides with replacement.

    AUC resamples the scored slides, FROC the FROC slides (independently, one generator seeded by
    ``seed``); resamples where the metric is undefined are skipped and counted.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    aucs: list[float] = []
    frocs: list[float] = []
    for _ in range(n):
        if labels.size:
            idx = rng.integers(0, labels.size, labels.size)
            auc = slide_auc(labels[idx], scores[idx])
            if auc is not None:
                aucs.append(auc)
        if froc_slides:
            idx = rng.integers(0, len(froc_slides), len(froc_slides))
            res = cohort_froc(
                [froc_slides[i] for i in idx],
                fp_on_negative_only=fp_on_negative_only,
                interpolation=interpolation,
            )
            if res is not None:
                frocs.append(res["score"])
    return {
        "n": n,
        "seed": seed,
        "auc_ci95": _ci(aucs),
        "froc_ci95": _ci(frocs),
        "n_valid_auc": len(aucs),
        "n_valid_froc": len(frocs),
    }


# -- the operating threshold -----------------------------------------------------------------------
OPERATING_METHODS = ("sensitivity", "youden")


def operating_threshold(
    labels: np.ndarray, scores: np.ndarray, method: str, target_sensitivity: float
) -> dict | None:
    """The slide-score threshold of the call (``score >= threshold``: tumour) chosen on labelled
    slides (``labels`` 1 = tumour, 0 = normal), with the sensitivity and specificity it reaches
    there; None when it cannot be chosen (no tumour slide; ``youden`` also needs normal ones).

    ``sensitivity``: the highest threshold whose slide sensitivity is at least
    ``target_sensitivity`` -- the ``ceil(target * n_tumour)``-th highest tumour score.
    ``youden``: the ROC point (``sklearn.metrics.roc_curve``) with the largest Youden's J =
    sensitivity + specificity - 1, the highest threshold among equal ones.
    """
    from sklearn.metrics import roc_curve

    if method not in OPERATING_METHODS:
        raise ValueError(f"method must be one of {OPERATING_METHODS}, got {method!r}")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    tumour, normal = np.sort(s[y == 1])[::-1], s[y == 0]
    if tumour.size == 0:
        return None
    if method == "sensitivity":
        k = max(1, math.ceil(target_sensitivity * tumour.size - 1e-9))
        threshold = float(tumour[k - 1])
    else:
        if normal.size == 0:
            return None
        fpr, tpr, thr = roc_curve(y, s)
        finite = np.isfinite(thr)
        j = tpr[finite] - fpr[finite]
        threshold = float(thr[finite][int(np.argmax(j))])
    sensitivity = float(np.mean(tumour >= threshold))
    specificity = float(np.mean(normal < threshold)) if normal.size else None
    return {
        "threshold": threshold,
        "method": method,
        "target_sensitivity": float(target_sensitivity) if method == "sensitivity" else None,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "n_tumor": int(tumour.size),
        "n_normal": int(normal.size),
    }


# -- reading a cohort ------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """What the evaluation reads of one slide."""

    slide_id: str
    label: str
    annotation: str
    lesions: pd.DataFrame
    score: float
    mpp: float
    slide_wh: tuple[int, int]
    model_checksum: str | None
    centre: str = ""  # the sheet's optional centre column


def _read_slide(row: dict, results_dir: Path, submission: Path | None = None) -> SlideResult:
    """One slide's results: ``lesions.csv`` (or ``<submission>/<slide_id>.csv``), the score and
    the map's slide size and mpp."""
    sid = row["slide_id"]
    base = results_dir / sid
    lesions_csv = base / "lesions.csv" if submission is None else submission / f"{sid}.csv"
    lesions = read_lesions_csv(lesions_csv, sid)
    rec = read_score_json(base / "score.json", sid)
    attrs = read_probmap_attrs(base / "probmap.h5", sid)
    return SlideResult(
        slide_id=sid,
        label=row["label"],
        annotation=row["annotation"],
        lesions=lesions,
        score=float(rec["score"]),
        mpp=float(attrs["mpp"]),
        slide_wh=(int(attrs["slide_width"]), int(attrs["slide_height"])),
        model_checksum=rec.get("model_checksum") or attrs.get("model_checksum"),
        centre=row.get("centre", ""),
    )


def slide_froc(
    res: SlideResult,
    base_dir: Path,
    warn: Callable[[str], None] | None = None,
    groups: AnnotationGroups = DEFAULT_GROUPS,
) -> SlideFROC:
    """Evaluation mask (tumour slides), ITC labels and matched detections of one slide.

    Annotation problems that do not stop the evaluation go to ``warn`` (default: the log)."""
    conf = res.lesions["confidence"].to_numpy()
    xy = res.lesions[["x", "y"]].to_numpy()
    if res.label != "tumor":
        return match_detections(res.slide_id, conf, xy, None, np.zeros(0), is_tumour=False)
    if not res.annotation:
        raise SlideError(
            res.slide_id, None, "tumour slide has no annotation: cannot build FROC mask"
        )
    path = Path(res.annotation)
    path = path if path.is_absolute() else base_dir / path
    tumour = tumour_mask_from_annotation(
        path, res.slide_wh, slide_id=res.slide_id, groups=groups, warn=warn
    )
    labels = evaluation_mask(tumour, res.mpp)
    itc = itc_labels(labels, res.mpp)
    return match_detections(res.slide_id, conf, xy, labels, itc, is_tumour=True)


# -- outputs ---------------------------------------------------------------------------------------
def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_write(path) as fh:
        df.to_csv(fh, index=False)


FROC_PLOT_XMAX = 8.5  #: the FROC plot's x range (FP per slide)


def froc_plot_curve(
    fps: np.ndarray, sensitivity: np.ndarray, x_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve as plotted: its points ordered by FP rate, held at its last sensitivity
    to ``x_max`` (as the score's interpolation holds it), so that a curve without false
    positives, a vertical line on the left border, shows as the top border it reaches."""
    order = np.lexsort((np.asarray(sensitivity), np.asarray(fps)))
    x = np.asarray(fps, dtype=np.float64)[order]
    y = np.asarray(sensitivity, dtype=np.float64)[order]
    if x.size and x[-1] < x_max:
        x, y = np.append(x, x_max), np.append(y, y[-1])
    return x, y


def _plot_froc(path: Path, froc: dict | None, ci: list[float] | None, rates) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    if froc is None:
        ax.text(0.5, 0.5, "FROC undefined (no lesions)", ha="center", va="center")
    else:
        label = f"FROC score {froc['score']:.4f}"
        if ci:
            label += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        fps, sens = froc_plot_curve(froc["fps"], froc["sensitivity"], FROC_PLOT_XMAX)
        ax.plot(fps, sens, "-", color="black", lw=2, label=label, clip_on=False, zorder=3)
        ax.plot(rates, froc["at"], "o", color="tab:red", label="at 0.25, 0.5, 1, 2, 4, 8 FP",
                clip_on=False, zorder=4)  # fmt: skip
        ax.set_xlim(-0.1, FROC_PLOT_XMAX)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("Average number of false positives per slide")
    ax.set_ylabel("Metastasis detection sensitivity")
    ax.set_title("FROC (Camelyon16 protocol)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png")


def _plot_roc(path: Path, roc: pd.DataFrame, auc: float | None, ci: list[float] | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.5), dpi=120)
    ax = fig.add_subplot()
    if auc is None:
        ax.text(0.5, 0.5, "AUC undefined (one class only)", ha="center", va="center")
    else:
        label = f"AUC {auc:.4f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        ax.plot(roc["fpr"], roc["tpr"], "-", color="black", label=label)
        ax.legend(loc="lower right", fontsize=8)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate (normal slides)")
    ax.set_ylabel("True positive rate (tumour slides)")
    ax.set_title("Slide classification ROC")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png")


def write_submission(out_dir: Path, results: list[SlideResult]) -> None:
    """Camelyon16 submission folder: ``<slide_id>.csv`` with header-less ``confidence,X,Y``,
    replacing an older folder once complete."""
    with atomic_dir(out_dir) as tmp:
        for r in results:
            pts = r.lesions[["confidence", "x", "y"]].to_numpy(dtype=np.float64)
            write_lesions_csv(tmp / f"{r.slide_id}.csv", pts, header=False)


def _model_provenance(model_path: str | Path | None) -> dict | None:
    """``{"path", "sha256", "round"}`` of the model checkpoint (sha256 None when the file is
    gone; round: the training round that wrote it, None for an untrained or foreign model)."""
    if model_path is None:
        return None
    from .errors import CheckpointError
    from .formats.checkpoint import read_checkpoint_config

    path = Path(model_path)
    if not path.is_file():
        return {"path": str(path), "sha256": None, "round": None}
    try:
        meta = read_checkpoint_config(path).get("meta") or {}
    except CheckpointError:
        meta = {}
    trained_round = meta.get("round") if meta.get("trained") else None
    return {"path": str(path), "sha256": sha256_file(path), "round": trained_round}


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# -- the parts of the stage ------------------------------------------------------------------------
@dataclass
class Warnings:
    """Warnings of one evaluation: logged, and listed in ``metrics.json``."""

    items: list[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        log.warning(message)
        self.items.append(message)


def failure_records(
    rows: list[dict],
    results_dir: Path,
    base_dir: Path,
    allow_missing: bool,
    failed: Sequence[str] | None,
) -> dict[str, dict[str, Any]]:
    """``{slide: failure record}`` of the slides the evaluation leaves out as failed: those named
    by ``failed`` (the workflow decides when it plans the run), else (``allow_missing``) those
    whose failure record is newer than their files."""
    if failed is not None and not allow_missing and failed:
        raise ConfigError("evaluate: --failed (slides to leave out) needs --allow-missing")
    if failed is not None:
        return {
            sid: read_failure_record(failure_record_path(results_dir, sid))
            or {"stage": None, "cause": RERUN_SINCE}
            for sid in failed
        }
    if not allow_missing:
        return {}
    inputs = {
        r["slide_id"]: [base_dir / p for p in (r["path"], r["annotation"]) if p] for r in rows
    }
    return failed_slides(results_dir, inputs)


def read_cohort(
    rows: list[dict],
    results_dir: Path,
    records: dict[str, dict[str, Any]],
    allow_missing: bool,
    warn: Warnings,
    submission: Path | None = None,
) -> tuple[list[SlideResult], list[dict]]:
    """The results of every slide of ``rows`` (lesions from ``submission`` when given); slides
    with a failure record in ``records`` (and, with ``allow_missing``, slides whose files cannot
    be read) are returned as missing."""
    from tqdm import tqdm

    results: list[SlideResult] = []
    missing: list[dict] = []
    for row in tqdm(rows, desc="reading results", unit="slide", mininterval=5):
        sid = row["slide_id"]
        record = records.get(sid)
        if record is not None:
            missing.append(
                {"slide_id": sid, "stage": record.get("stage"), "cause": record.get("cause")}
            )
            warn(f"slide {sid}: left out: {describe_failure(record)}")
            continue
        try:
            results.append(_read_slide(row, results_dir, submission))
        except SlideError as exc:
            earlier = read_failure_record(failure_record_path(results_dir, sid))
            if earlier is not None:
                exc = SlideError(sid, exc.path, f"{exc.cause} (its {describe_failure(earlier)})")
            if not allow_missing:
                raise exc from None
            missing.append({"slide_id": sid, "stage": None, "cause": str(exc)})
            warn(f"slide {sid}: left out: {exc}")
    return results, missing


SLIDE_COLUMNS = (
    "slide_id", "label", "score", "n_lesions", "n_detections", "tp", "fp", "itc_hits", "n_itc",
    "in_froc", "centre",
)  # fmt: skip


def match_cohort(
    results: list[SlideResult],
    exclude: set[str],
    base_dir: Path,
    warn: Warnings,
    *,
    groups: AnnotationGroups = DEFAULT_GROUPS,
    allow_missing: bool = False,
) -> tuple[list[SlideResult], list[SlideFROC], pd.DataFrame, list[dict]]:
    """Every slide's FROC contribution (excluded slides have none) and the per-slide table.

    Returns ``(results, froc_slides, table, missing)``: with ``allow_missing``, a slide whose
    annotation cannot be used (:class:`SlideError`) is left out of everything and listed in
    ``missing`` with its cause; without, the error stops the evaluation."""
    from tqdm import tqdm

    kept: list[SlideResult] = []
    froc_slides: list[SlideFROC] = []
    missing: list[dict] = []
    per_slide = []
    for res in tqdm(results, desc="FROC masks", unit="slide", mininterval=5):
        in_froc = res.slide_id not in exclude
        try:
            sf = slide_froc(res, base_dir, warn, groups) if in_froc else None
        except SlideError as exc:
            if not allow_missing:
                raise
            missing.append({"slide_id": res.slide_id, "stage": None, "cause": str(exc)})
            warn(f"slide {res.slide_id}: left out: {exc}")
            continue
        kept.append(res)
        if sf is not None:
            froc_slides.append(sf)
        per_slide.append(
            {
                "slide_id": res.slide_id,
                "label": res.label,
                "score": res.score,
                "n_lesions": sf.n_lesions if sf else None,
                "n_detections": len(res.lesions),
                "tp": sf.tp if sf else None,
                "fp": sf.fp if sf else None,
                "itc_hits": sf.itc_hits if sf else None,
                "n_itc": sf.n_itc if sf else None,
                "in_froc": in_froc,
                "centre": res.centre,
            }
        )
    counts = ("n_lesions", "tp", "fp", "itc_hits", "n_itc")
    table = pd.DataFrame(per_slide, columns=list(SLIDE_COLUMNS)).astype(
        {c: "Int64" for c in counts}
    )
    return kept, froc_slides, table, missing


def slide_roc(
    results: list[SlideResult],
) -> tuple[np.ndarray, np.ndarray, float | None, pd.DataFrame]:
    """Labels (tumour = 1), scores, AUC (None with one class only) and the ROC curve table."""
    from sklearn.metrics import roc_curve

    y = np.array([r.label == "tumor" for r in results], dtype=np.int64)
    s = np.array([r.score for r in results], dtype=np.float64)
    auc = slide_auc(y, s)
    if auc is None:
        return y, s, None, pd.DataFrame({"fpr": [], "tpr": [], "threshold": []})
    fpr, tpr, thr = roc_curve(y, s)
    return y, s, auc, pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def froc_table(froc: dict | None) -> pd.DataFrame:
    """The FROC curve as a table (empty when undefined)."""
    if froc is None:
        return pd.DataFrame({"fp_per_slide": [], "sensitivity": [], "threshold": []})
    return pd.DataFrame(
        {
            "fp_per_slide": froc["fps"],
            "sensitivity": froc["sensitivity"],
            "threshold": froc["thresholds"],
        }
    )


def write_cohort_outputs(
    out_dir: Path,
    metrics: dict,
    tables: dict[str, pd.DataFrame],
    froc: dict | None,
    auc: float | None,
    results: list[SlideResult],
) -> None:
    """``metrics.json``, the CSV tables, the FROC and ROC plots and the submission folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        _write_csv(out_dir / f"{name}.csv", table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _plot_froc(out_dir / "froc.png", froc, metrics["froc_ci95"], FROC_RATES)
        _plot_roc(out_dir / "roc.png", tables["roc"], auc, metrics["auc_ci95"])
    write_submission(out_dir / "submission", results)
    write_json(out_dir / "metrics.json", metrics)


# -- the stage -------------------------------------------------------------------------------------
def evaluate(
    sheet: str | Path,
    model: str | Path | None,
    params: EvaluateParams,
    *,
    results_dir: str | Path,
    out_dir: str | Path,
    base_dir: str | Path = ".",
    config_checksum: str | None = None,
    failed: Sequence[str] | None = None,
    submission: str | Path | None = None,
) -> dict:
    """Stage ``evaluate``: FROC (Camelyon16) and slide AUC of the ``params.split`` slides
    labelled tumor/normal in ``sheet``, from ``results_dir/<slide_id>/{lesions.csv,score.json,
    probmap.h5}``.

    ``params.exclude``: slide IDs left out of the FROC (not of the AUC). ``params.allow_missing``:
    slides whose outputs are missing or unreadable, or whose per-slide job left a failure record
    (see :func:`failure_records`), are listed under ``missing`` in ``metrics.json`` instead of
    stopping the run; ``failed`` names those slides instead, as the workflow decides when it plans
    the run, so that the evaluation reads exactly the slides it declared as inputs. Paths in the
    sheet are relative to ``base_dir``. ``config_checksum`` and ``model`` (the checkpoint that
    scored the slides; its SHA-256 is recorded) are provenance. ``submission``: a folder of
    Camelyon16 ``<slide_id>.csv`` files (``confidence,X,Y``, with or without a header, 0 bytes
    for no detection; e.g. an earlier run's ``submission/``), read instead of each slide's
    ``lesions.csv`` (scores, slide sizes and mpp still come from ``results_dir``). The
    annotation groups are ``params.tumour_groups`` and ``params.exclusion_groups``. Writes into
    ``out_dir``:
    ``metrics.json``, ``froc.csv``, ``roc.csv``, ``slides.csv``, ``froc.png``, ``roc.png`` and
    ``submission/``; returns the metrics.
    """
    from .config import load_samples

    results_dir, out_dir, base_dir = Path(results_dir), Path(out_dir), Path(base_dir)
    submission = Path(submission) if submission is not None else None
    if submission is not None and not submission.is_dir():
        raise ConfigError(f"evaluate: submission folder {str(submission)!r} not found")
    if submission is not None and submission.resolve() == (out_dir / "submission").resolve():
        raise ConfigError(
            f"evaluate: the submission folder {str(submission)!r} is the one this evaluation "
            "writes; evaluate it into another --out-dir"
        )
    groups = AnnotationGroups.of(params)
    samples = load_samples(sheet, base_dir=base_dir, check_files=False)
    labelled = samples["label"].isin(LABELS) & (samples["split"] == params.split)
    rows = samples[labelled].to_dict("records")
    warn = Warnings()
    if not rows:
        warn(f"no slide of split {params.split!r} is labelled tumor or normal in {sheet}")
    exclude = set(params.exclude)
    unknown = sorted(exclude - {r["slide_id"] for r in rows})
    if unknown:
        log.info("excluded IDs not among the evaluated slides: %s", unknown)

    records = failure_records(rows, results_dir, base_dir, params.allow_missing, failed)
    results, missing = read_cohort(
        rows, results_dir, records, params.allow_missing, warn, submission
    )
    results, froc_slides, slides_table, unusable = match_cohort(
        results, exclude, base_dir, warn, groups=groups, allow_missing=params.allow_missing
    )
    missing += unusable
    y, s, auc, roc = slide_roc(results)
    if auc is None:
        warn(f"AUC undefined: {len(results)} slides with only one class present")
    options = {
        "fp_on_negative_only": params.fp_on_negative_only,
        "interpolation": params.interpolation,
    }
    froc = cohort_froc(froc_slides, **options)
    if froc is None:
        warn("FROC undefined: no non-ITC lesion (or no slide to count FPs on) among the slides")
    boot = bootstrap_cis(y, s, froc_slides, n=params.bootstrap, seed=params.seed, **options)
    metrics = cohort_metrics(
        params, results, froc_slides, y, auc, froc, boot, missing, warn,
        model=model, config_checksum=config_checksum, submission=submission,
    )  # fmt: skip
    metrics["operating_threshold"] = operating_threshold(
        y, s, params.method, params.target_sensitivity
    )
    tables = {"froc": froc_table(froc), "roc": roc, "slides": slides_table}
    write_cohort_outputs(out_dir, metrics, tables, froc, auc, results)
    log.info(
        "%d slides: AUC %s, FROC %s (%d lesions, %d ITC, %d FROC slides)",
        len(results),
        "n/a" if auc is None else f"{auc:.4f}",
        "n/a" if froc is None else f"{froc['score']:.4f}",
        metrics["n_lesions"],
        metrics["n_itc"],
        len(froc_slides),
    )
    return metrics


NO_CENTRE = "(no centre)"


def centre_metrics(
    results: list[SlideResult],
    froc_slides: list[SlideFROC],
    *,
    fp_on_negative_only: bool = False,
    interpolation: str = "linear",
) -> dict[str, dict[str, Any]]:
    """The cohort figures of each centre (the sheet's ``centre`` column) on its own slides:
    ``{centre: {n_slides, n_tumor, n_normal, auc, froc, fp_per_normal_slide, sensitivity_at_fp,
    n_lesions}}``, the FROC's false positives per slide counted over the centre's slides. Slides
    without a centre form ``"(no centre)"`` when other slides have one; ``{}`` when none has."""
    if not any(r.centre for r in results):
        return {}
    by_id = {sf.slide_id: sf for sf in froc_slides}
    out: dict[str, dict[str, Any]] = {}
    for centre in sorted({r.centre or NO_CENTRE for r in results}):
        mine = [r for r in results if (r.centre or NO_CENTRE) == centre]
        slides = [by_id[r.slide_id] for r in mine if r.slide_id in by_id]
        y = np.array([r.label == "tumor" for r in mine], dtype=np.int64)
        auc = slide_auc(y, np.array([r.score for r in mine], dtype=np.float64))
        froc = cohort_froc(
            slides, fp_on_negative_only=fp_on_negative_only, interpolation=interpolation
        )
        out[centre] = {
            "n_slides": len(mine),
            "n_tumor": int(y.sum()),
            "n_normal": int(len(y) - y.sum()),
            "auc": _json_float(auc),
            "froc": _json_float(froc["score"]) if froc else None,
            "fp_per_normal_slide": fp_per_normal_slide(mine),
            "sensitivity_at_fp": {
                f"{r:g}": (float(froc["at"][k]) if froc else None) for k, r in enumerate(FROC_RATES)
            },
            "n_lesions": int(sum(sf.n_lesions for sf in slides)),
        }
    return out


def fp_per_normal_slide(results: list[SlideResult]) -> float | None:
    """Mean number of lesion points per normal slide: each one a false positive (at the
    detection threshold). None without normal slides."""
    counts = [len(r.lesions) for r in results if r.label == "normal"]
    return float(np.mean(counts)) if counts else None


def cohort_metrics(
    params: EvaluateParams,
    results: list[SlideResult],
    froc_slides: list[SlideFROC],
    y: np.ndarray,
    auc: float | None,
    froc: dict | None,
    boot: dict,
    missing: list[dict],
    warn: Warnings,
    *,
    model: str | Path | None,
    config_checksum: str | None,
    submission: Path | None = None,
) -> dict:
    """The content of ``metrics.json``."""
    outside = sum(sf.outside for sf in froc_slides)
    if outside:
        warn(
            f"{outside} detections lay outside their evaluation mask (the slide, or a mask level "
            "rounded down) and were counted as FP"
        )
    checksums = sorted({r.model_checksum for r in results if r.model_checksum})
    if len(checksums) > 1:
        warn(f"slides were scored by {len(checksums)} different models: {checksums}")
    provenance = _model_provenance(model)
    if provenance and checksums and checksums != [provenance["sha256"]]:
        warn(
            f"slides were scored by {checksums}, not by the model {model} "
            f"({provenance['sha256']}): re-run the workflow"
        )
    return {
        "wsiscan_version": __version__,
        "split": params.split,
        "n_slides": len(results),
        "n_tumor": int(y.sum()),
        "n_normal": int(len(y) - y.sum()),
        "fp_per_normal_slide": fp_per_normal_slide(results),
        "auc": _json_float(auc),
        "auc_ci95": boot["auc_ci95"],
        "froc": _json_float(froc["score"]) if froc else None,
        "froc_ci95": boot["froc_ci95"],
        "sensitivity_at_fp": {
            f"{r:g}": (float(froc["at"][k]) if froc else None) for k, r in enumerate(FROC_RATES)
        },
        "n_froc_slides": len(froc_slides),
        "n_lesions": int(sum(sf.n_lesions for sf in froc_slides)),
        "n_itc": int(sum(sf.n_itc for sf in froc_slides)),
        "n_detections": int(sum(sf.n_detections for sf in froc_slides)),
        "excluded": sorted(set(params.exclude) & {r.slide_id for r in results}),
        "missing": missing,
        "bootstrap": {k: boot[k] for k in ("n", "seed", "n_valid_auc", "n_valid_froc")},
        "centres": centre_metrics(
            results,
            froc_slides,
            fp_on_negative_only=params.fp_on_negative_only,
            interpolation=params.interpolation,
        ),  # fmt: skip
        "config": {
            "split": params.split,
            "exclude": list(params.exclude),
            "fp_on_negative_only": params.fp_on_negative_only,
            "interpolation": params.interpolation,
            "bootstrap": params.bootstrap,
            "seed": params.seed,
            "allow_missing": params.allow_missing,
            "tumour_groups": list(params.tumour_groups),
            "exclusion_groups": list(params.exclusion_groups),
            "eval_downsample": EVAL_DOWNSAMPLE,
            "growth_um": GROWTH_UM,
            "itc_major_axis_um": ITC_MAJOR_AXIS_UM,
            "froc_rates": list(FROC_RATES),
        },
        "model_checksums": checksums,
        "model": provenance,
        "config_checksum": config_checksum,
        "lesions_from": "results" if submission is None else str(submission),
        "warnings": warn.items,
    }


# -- the rounds side by side -----------------------------------------------------------------------
ROUND_COLUMNS = (
    "round", "model", "n_slides", "auc", "froc", "fp_per_normal_slide", "sensitivity_at_0.25_fp",
    "sensitivity_at_0.5_fp", "sensitivity_at_1_fp",
)  # fmt: skip


def round_summary(
    metrics: Sequence[str | Path], out_rounds: str | Path, params: RoundSummaryParams
) -> pd.DataFrame:
    """Stage ``round_summary``: one row per ``metrics.json`` (the evaluation of one training
    round's model), by round: AUC, FROC, false positives per normal slide and the sensitivity at
    0.25, 0.5 and 1 FP per slide. Writes ``rounds.tsv``; returns the table."""
    rows = []
    for path in metrics:
        try:
            m = json.loads(Path(path).read_text())
            sens = m["sensitivity_at_fp"]
            rows.append(
                {
                    "round": (m.get("model") or {}).get("round"),
                    "model": (m.get("model") or {}).get("path"),
                    "n_slides": m["n_slides"],
                    "auc": m["auc"],
                    "froc": m["froc"],
                    "fp_per_normal_slide": m.get("fp_per_normal_slide"),
                    "sensitivity_at_0.25_fp": sens.get("0.25"),
                    "sensitivity_at_0.5_fp": sens.get("0.5"),
                    "sensitivity_at_1_fp": sens.get("1"),
                }
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SlideError(None, path, f"not a metrics.json of the evaluate stage: {exc!r}")
    table = pd.DataFrame(rows, columns=list(ROUND_COLUMNS)).sort_values("round", kind="stable")
    with atomic_write(out_rounds) as fh:
        table.to_csv(fh, sep="\t", index=False)
    log.info("rounds:\n%s", table.to_string(index=False))
    return table
