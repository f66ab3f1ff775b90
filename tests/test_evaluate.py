"""Camelyon16 FROC, slide AUC and the cohort evaluation stage, against answers built by hand and
against a plain transcription of the official ``Evaluation_FROC.py`` algorithm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as nd
from skimage import measure
from skimage.draw import polygon as draw_polygon

from wsiscan import __version__
from wsiscan.errors import ConfigError, SlideError
from wsiscan.evaluate import (
    FROC_RATES,
    SlideFROC,
    check_label_image,
    cohort_froc,
    eval_mask_shape,
    evaluate,
    evaluation_mask,
    froc_curve,
    froc_score,
    itc_labels,
    match_detections,
    slide_auc,
    tumour_mask_from_tiff,
)
from wsiscan.formats.lesions import write_lesions_csv
from wsiscan.params import DetectParams, EvaluateParams

# -- a plain transcription of the official algorithm (loops, Python lists) ------------------------
LEVEL = 5


def ref_evaluation_mask(tumour: np.ndarray, resolution: float) -> np.ndarray:
    pixelarray = np.where(tumour, 255, 0).astype(np.uint8)[:, :, None]  # channel 0 of the mask
    distance = nd.distance_transform_edt(255 - pixelarray[:, :, 0])
    threshold = 75 / (resolution * pow(2, LEVEL) * 2)
    binary = distance < threshold
    filled_image = nd.binary_fill_holes(binary)
    return measure.label(filled_image, connectivity=2)


def ref_itc_list(evaluation_mask_: np.ndarray, resolution: float) -> list[int]:
    max_label = np.amax(evaluation_mask_)
    properties = measure.regionprops(evaluation_mask_)
    isolated_tumor_cells = []
    threshold = 275 / (resolution * pow(2, LEVEL))
    for i in range(0, max_label):
        if properties[i].axis_major_length < threshold:
            isolated_tumor_cells.append(i + 1)
    return isolated_tumor_cells


def ref_fp_tp_probs(ycorr, xcorr, probs, is_tumor, evaluation_mask_, itc):
    max_label = np.amax(evaluation_mask_)
    fp_probs = []
    tp_probs = np.zeros((max_label,), dtype=np.float32)
    if is_tumor:
        for i in range(0, len(xcorr)):
            hitted = evaluation_mask_[ycorr[i] // pow(2, LEVEL), xcorr[i] // pow(2, LEVEL)]
            if hitted == 0:
                fp_probs.append(probs[i])
            elif hitted not in itc:  # noqa: SIM102 (kept as the original reads)
                if probs[i] > tp_probs[hitted - 1]:
                    tp_probs[hitted - 1] = probs[i]
    else:
        for i in range(0, len(xcorr)):
            fp_probs.append(probs[i])
    num_of_tumors = max_label - len(itc)
    return fp_probs, tp_probs, num_of_tumors


def ref_froc(fp_lists, tp_lists, n_cases, tumor_counts):
    unlisted_fps = [item for sublist in fp_lists for item in sublist]
    unlisted_tps = [item for sublist in tp_lists for item in sublist]
    total_fps, total_tps = [], []
    # The script ran on NumPy 1, where a float32 scalar and a Python float compare in float64;
    # NumPy 2 compares them in float32, which would make set() and sorted() disagree. float()
    # restores the original scalar semantics; the array comparisons below behave alike in both
    # (a Python-float threshold is cast to the float32 TP array's type).
    all_probs = sorted({float(p) for p in unlisted_fps + unlisted_tps})
    for thresh in all_probs[1:]:
        total_fps.append((np.asarray(unlisted_fps) >= thresh).sum())
        total_tps.append((np.asarray(unlisted_tps) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    total_fps = np.asarray(total_fps) / float(n_cases)
    total_sensitivity = np.asarray(total_tps) / float(sum(tumor_counts))
    return total_fps, total_sensitivity


def ref_score(total_fps, total_sensitivity):
    return float(
        np.mean(np.interp([0.25, 0.5, 1, 2, 4, 8], total_fps[::-1], total_sensitivity[::-1]))
    )


def ref_read_csv(path: Path):
    probs, xs, ys = [], [], []
    for line in path.read_text().splitlines():
        elems = line.rstrip().split(",")
        probs.append(float(elems[0]))
        xs.append(int(elems[1]))
        ys.append(int(elems[2]))
    return probs, xs, ys


# -- helpers ---------------------------------------------------------------------------------------
def random_tumour_mask(rng, shape, n_polys, mpp):
    """Star polygons of random size (a few um to ~1.5 mm across) rasterised at downsample 32."""
    mask = np.zeros(shape, dtype=bool)
    polys = []
    for _ in range(n_polys):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        radius_px = rng.choice([rng.uniform(5, 60), rng.uniform(60, 700)]) / (mpp * 32)
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
        radii = radius_px * rng.uniform(0.4, 1.0, angles.size)
        rr, cc = cy + radii * np.sin(angles), cx + radii * np.cos(angles)
        r, c = draw_polygon(rr, cc, shape=shape)
        mask[r, c] = True
        polys.append(np.column_stack([cc, rr]) * 32)  # level-0 (x, y)
    return mask, polys


def random_detections(rng, shape, tumour, n):
    """Uniform points plus points on tumour; confidences with ties and shared FP/TP values."""
    h, w = shape
    xs = list(rng.integers(0, w * 32, n))
    ys = list(rng.integers(0, h * 32, n))
    on = np.argwhere(tumour)
    if len(on):
        pick = on[rng.integers(0, len(on), n)]
        xs += list(pick[:, 1] * 32 + rng.integers(0, 32, n))
        ys += list(pick[:, 0] * 32 + rng.integers(0, 32, n))
    k = len(xs)
    conf = rng.random(k)
    conf[rng.random(k) < 0.1] = 0.5  # exact ties
    ties = rng.random(k) < 0.4
    conf[ties] = np.round(conf[ties], 2)  # 0.7 on a FP and on a TP: the float32 quirk
    f32 = rng.random(k) < 0.2
    conf[f32] = conf[f32].astype(np.float32)
    return conf, np.asarray(xs, np.int64), np.asarray(ys, np.int64)


# -- hand-made answers -----------------------------------------------------------------------------
def two_lesion_slide():
    """100 x 100 evaluation cells at 0.243 um/px: a large lesion (label 1) and an ITC (label 2)."""
    tumour = np.zeros((100, 100), dtype=bool)
    tumour[10:40, 10:50] = True
    tumour[80, 80] = True
    labels = evaluation_mask(tumour, 0.243)
    itc = itc_labels(labels, 0.243)
    return labels, itc


def test_itc_hit_is_neither_tp_nor_fp_and_two_hits_count_once():
    labels, itc = two_lesion_slide()
    assert labels.max() == 2 and list(itc) == [2]
    assert labels[80, 80] == 2 and labels[20, 20] == 1
    conf = np.array([0.9, 0.6, 0.8, 0.7])
    xy = np.array([[80 * 32 + 5, 80 * 32 + 5], [20 * 32, 20 * 32], [45 * 32, 30 * 32], [5, 5]])
    s = match_detections("t", conf, xy, labels, itc, is_tumour=True)
    assert s.itc_hits == 1
    assert s.fp == 1 and s.fp_probs.tolist() == [0.7]
    assert s.tp == 1 and s.n_lesions == 1 and s.n_itc == 1
    assert s.tp_probs.dtype == np.float32
    assert s.tp_probs.tolist() == [np.float32(0.8), 0.0]  # the higher of the two hits, once
    fps, sens, thr = froc_curve(s.fp_probs, s.tp_probs, 1, s.n_lesions)
    # thresholds {0, 0.7, 0.8f} without the lowest, then the (0, 0) point
    np.testing.assert_array_equal(fps, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(sens, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(thr, [0.7, np.float32(0.8), np.inf])
    assert froc_score(fps, sens)[0] == 1.0


def test_detections_on_a_normal_slide_are_false_positives():
    labels, itc = two_lesion_slide()
    t = match_detections("t", [0.6], [[20 * 32, 20 * 32]], labels, itc, is_tumour=True)
    n = match_detections("n", [0.9, 0.5], [[20 * 32, 20 * 32], [0, 0]], None, [], is_tumour=False)
    assert n.fp == 2 and n.n_lesions == 0 and n.tp_probs.size == 0
    res = cohort_froc([t, n])
    # thresholds {0, 0.5, 0.6f, 0.9} -> [0.5, 0.6f, 0.9]; FPs over 2 slides
    np.testing.assert_array_equal(res["fps"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(res["sensitivity"], [1.0, 1.0, 0.0, 0.0])
    # the variant: FPs on normal slides only, over the number of normal slides
    var = cohort_froc([t, n], fp_on_negative_only=True)
    np.testing.assert_array_equal(var["fps"], [2.0, 1.0, 1.0, 0.0])


def test_detection_outside_the_mask_is_a_false_positive():
    labels, itc = two_lesion_slide()
    s = match_detections("t", [0.5, 0.4], [[-1, 10], [3200, 3199]], labels, itc, is_tumour=True)
    assert s.fp == 2 and s.outside == 2


def test_float32_quirk_counts_a_tp_at_an_fp_threshold():
    """TP probabilities are float32: float32(0.7) < 0.7, yet it counts at threshold 0.7."""
    fps, sens, thr = froc_curve(np.array([0.7, 0.1]), np.array([0.7, 0.0], np.float32), 1, 2)
    # thresholds {0, 0.1, 0.7f, 0.7} without the lowest
    assert thr.tolist() == [0.1, float(np.float32(0.7)), 0.7, np.inf]
    np.testing.assert_array_equal(fps, [2.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(sens, [0.5, 0.5, 0.5, 0.0])  # in float64 the third would be 0


def test_interpolation_at_the_six_rates_on_a_hand_made_curve():
    fps = np.array([3.0, 1.5, 0.5, 0.0])
    sens = np.array([0.9, 0.8, 0.6, 0.0])
    score, at = froc_score(fps, sens)
    np.testing.assert_allclose(at, [0.3, 0.6, 0.7, 0.8 + 0.1 / 3, 0.9, 0.9])
    assert score == pytest.approx((0.3 + 0.6 + 0.7 + 0.8 + 0.1 / 3 + 0.9 + 0.9) / 6)
    score, at = froc_score(fps, sens, interpolation="nearest")
    np.testing.assert_allclose(at, [0.0, 0.6, 0.6, 0.8, 0.9, 0.9])
    assert score == pytest.approx(3.8 / 6)
    with pytest.raises(ValueError):
        froc_score(fps, sens, interpolation="cubic")
    assert FROC_RATES == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# 0.234375 um/px puts the limit at exactly 5 px: a gap cell at distance 5 is outside (strict <)
@pytest.mark.parametrize(
    ("mpp", "merge_gap", "split_gap"),
    [(0.243, 8, 9), (0.25, 8, 9), (0.5, 4, 5), (0.234375, 8, 9)],
)
def test_75um_growth_merges_close_lesions_and_keeps_far_ones_apart(mpp, merge_gap, split_gap):
    """Two lesions merge when every cell of the gap lies within 37.5 um (half of 75) of one."""
    for gap, n_expected in ((merge_gap, 1), (split_gap, 2)):
        tumour = np.zeros((60, 80), dtype=bool)
        tumour[20:40, 10:30] = True
        tumour[20:40, 30 + gap : 50 + gap] = True
        assert evaluation_mask(tumour, mpp).max() == n_expected, (mpp, gap)


def test_slide_at_another_mpp_changes_growth_and_itc():
    tumour = np.zeros((80, 120), dtype=bool)
    tumour[20:40, 10:30] = True
    tumour[20:40, 36:56] = True  # 6 cells apart: merged at 0.25 um/px (4.7 px), not at 0.5 (2.3)
    assert evaluation_mask(tumour, 0.25).max() == 1
    assert evaluation_mask(tumour, 0.5).max() == 2
    # a 20-cell square lesion: 160 um at 0.25 um/px (ITC), 320 um at 0.5 um/px (not ITC)
    single = np.zeros((80, 80), dtype=bool)
    single[30:50, 30:50] = True
    assert list(itc_labels(evaluation_mask(single, 0.25), 0.25)) == [1]
    assert list(itc_labels(evaluation_mask(single, 0.5), 0.5)) == []


def test_empty_tumour_mask_gives_no_lesions():
    labels = evaluation_mask(np.zeros((10, 10), dtype=bool), 0.25)
    assert labels.max() == 0
    assert cohort_froc([match_detections("t", [0.5], [[0, 0]], labels, [], is_tumour=True)]) is None


def test_auc_equals_scikit_learn_and_is_none_with_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = rng.random(50)
    assert slide_auc(y, s) == roc_auc_score(y, s)
    assert slide_auc(np.zeros(5), rng.random(5)) is None


@pytest.mark.parametrize("seed", range(8))
def test_froc_equals_the_official_algorithm_on_random_cohorts(seed):
    rng = np.random.default_rng(100 + seed)
    ours: list[SlideFROC] = []
    fp_lists, tp_lists, counts = [], [], []
    n_slides = int(rng.integers(2, 9))
    for k in range(n_slides):
        mpp = float(rng.choice([0.243, 0.25, 0.5]))
        shape = eval_mask_shape((int(rng.integers(2000, 9000)), int(rng.integers(2000, 9000))))
        is_tumour = k == 0 or rng.random() < 0.6
        if is_tumour:
            tumour, _ = random_tumour_mask(rng, shape, int(rng.integers(1, 6)), mpp)
            if not tumour.any():
                tumour[shape[0] // 2, shape[1] // 2] = True
        else:
            tumour = np.zeros(shape, dtype=bool)
        conf, xs, ys = random_detections(rng, shape, tumour, int(rng.integers(0, 30)))
        # reference: official functions on Python lists
        if is_tumour:
            ref_mask = ref_evaluation_mask(tumour, mpp)
            ref_itc = ref_itc_list(ref_mask, mpp)
        else:
            ref_mask, ref_itc = 0, []
        fp, tp, n = ref_fp_tp_probs(
            ys.tolist(), xs.tolist(), conf.tolist(), is_tumour, ref_mask, ref_itc
        )
        fp_lists.append(fp)
        tp_lists.append(tp)
        counts.append(n)
        # ours
        labels = evaluation_mask(tumour, mpp) if is_tumour else None
        if is_tumour:
            np.testing.assert_array_equal(labels, ref_mask)
            itc = itc_labels(labels, mpp)
            assert itc.tolist() == ref_itc
        else:
            itc = np.zeros(0)
        s = match_detections(
            f"s{k}", conf, np.column_stack([xs, ys]), labels, itc, is_tumour=is_tumour
        )
        assert s.fp_probs.tolist() == fp
        np.testing.assert_array_equal(s.tp_probs, tp)
        assert s.n_lesions == n
        ours.append(s)
    if sum(counts) == 0:
        pytest.skip("random cohort without a non-ITC lesion")  # not hit with these seeds
    want_fps, want_sens = ref_froc(fp_lists, tp_lists, n_slides, counts)
    got = cohort_froc(ours)
    np.testing.assert_array_equal(got["fps"], want_fps)
    np.testing.assert_array_equal(got["sensitivity"], want_sens)
    assert got["score"] == ref_score(want_fps, want_sens)


# -- mask TIFF ground truth ------------------------------------------------------------------------
def write_mask_pyramid(
    path: Path, mask0: np.ndarray, levels: int = 6, rounding: str = "ceil"
) -> Path:
    """A tiled pyramid whose level k+1 is every second pixel of level k; an odd side rounds up
    (``ceil``) or down (``floor``), as pyramid writers do. RGB when ``mask0`` is (H, W, 3)."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        lvl = mask0
        for k in range(levels):
            tile = (256, 256) if min(lvl.shape[:2]) >= 256 else (16, 16)
            tw.write(
                lvl,
                tile=tile,
                photometric="rgb" if lvl.ndim == 3 else "minisblack",
                compression="deflate",
                subfiletype=1 if k else 0,
            )
            if rounding == "floor":
                lvl = lvl[: lvl.shape[0] // 2 * 2, : lvl.shape[1] // 2 * 2]
            lvl = lvl[::2, ::2]
    return path


def ref_compute_evaluation_mask(mask_path: Path, resolution: float) -> np.ndarray:
    """computeEvaluationMask as the official script reads the mask: OpenSlide level 5, whole."""
    import openslide

    slide = openslide.open_slide(str(mask_path))
    dims = slide.level_dimensions[LEVEL]
    pixelarray = np.array(slide.read_region((0, 0), LEVEL, dims))
    distance = nd.distance_transform_edt(255 - pixelarray[:, :, 0])
    threshold = 75 / (resolution * pow(2, LEVEL) * 2)
    binary = distance < threshold
    filled_image = nd.binary_fill_holes(binary)
    return measure.label(filled_image, connectivity=2)


def averaged_downsample_tumour(mask_path: Path, slide_wh) -> np.ndarray:
    """What tumour_mask_from_tiff computed before issue 14: the nearest level sampled at the cell
    centres by OpenSlide's downsample of that level (averaged over x and y), padded to the
    ceil-sized evaluation mask. Kept to measure what the fix changes."""
    import openslide

    with openslide.OpenSlide(str(mask_path)) as osr:
        ds = np.asarray(osr.level_downsamples)
        level = int(np.argmin(np.abs(np.log(ds / 32))))
        lw, lh = osr.level_dimensions[level]
        rgba = np.asarray(osr.read_region((0, 0), level, (lw, lh)))
        rows, cols = eval_mask_shape(osr.dimensions)
    src_r = np.clip(np.floor((np.arange(rows) + 0.5) * 32 / ds[level]), 0, lh - 1).astype(int)
    src_c = np.clip(np.floor((np.arange(cols) + 0.5) * 32 / ds[level]), 0, lw - 1).astype(int)
    out = np.zeros(eval_mask_shape(slide_wh), bool)
    out[:rows, :cols] = ((rgba[..., 0] > 0) & (rgba[..., 3] > 0))[np.ix_(src_r, src_c)]
    return out


def star_lesions(rng, shape0, n, *, x_from=0.0, y_from=0.0) -> np.ndarray:
    """A binary (0/255) level-0 mask of ``n`` star polygons, 30-700 um across at 0.243 um/px,
    centred in the part of the slide right of ``x_from`` and below ``y_from`` (fractions)."""
    h, w = shape0
    mask0 = np.zeros(shape0, np.uint8)
    for _ in range(n):
        cy, cx = rng.uniform(y_from * h, h), rng.uniform(x_from * w, w)
        radius = rng.uniform(15, 350) / 0.243
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 10)))
        radii = radius * rng.uniform(0.4, 1.0, angles.size)
        r, c = draw_polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape0)
        mask0[r, c] = 255
    return mask0


def edge_and_random_detections(
    rng, labels: np.ndarray, slide_wh, n_edge: int, n_random: int, *, x_from=0.0, y_from=0.0
) -> np.ndarray:
    """``(K, 3) [confidence, x, y]``: on cells just inside the border of the evaluation mask's
    regions right of ``x_from`` and below ``y_from`` (fractions; where a one-cell shift changes
    the answer), and anywhere inside the level-5 extent."""
    rows, cols = labels.shape
    edge = (labels > 0) & ~nd.binary_erosion(labels > 0)
    edge[: int(y_from * rows)] = False
    edge[:, : int(x_from * cols)] = False
    cells = np.argwhere(edge)
    cells = cells[rng.choice(len(cells), min(n_edge, len(cells)), replace=False)]
    anywhere = np.column_stack([rng.integers(0, rows, n_random), rng.integers(0, cols, n_random)])
    rc = np.concatenate([cells, anywhere])
    x = np.minimum(rc[:, 1] * 32 + rng.integers(0, 32, len(rc)), slide_wh[0] - 1)
    y = np.minimum(rc[:, 0] * 32 + rng.integers(0, 32, len(rc)), slide_wh[1] - 1)
    conf = np.round(rng.random(len(rc)), 3)
    return np.column_stack([conf, x, y])


#: (level-0 width, height, rounding of odd pyramid sides, where the lesions lie): both sides odd,
#: only the height odd (x of a wide slide drifts), only the width odd (y of a tall slide drifts)
ODD_MASKS = {
    "both_odd_floor": (6170, 4937, "floor", 0.6, 0.0),
    "both_odd_ceil": (4001, 3333, "ceil", 0.4, 0.4),
    "height_odd_ceil": (9600, 1601, "ceil", 0.3, 0.0),
    "width_odd_floor": (1631, 9600, "floor", 0.0, 0.3),
}


def test_odd_sized_mask_tiffs_match_the_official_script(tmp_path):
    """Mask TIFFs whose sides are not multiples of 32: the evaluation mask is the official one
    pixel for pixel and the cohort FROC the official one; the averaged-downsample sampling of
    before shifts the masks. ``pytest -s -k odd_sized`` prints the FROC differences."""
    rng = np.random.default_rng(16)
    rows, official, old_slides = [], {}, []
    for sid, (w, h, rounding, x_from, y_from) in ODD_MASKS.items():
        mask0 = star_lesions(rng, (h, w), 6, x_from=x_from, y_from=y_from)
        path = write_mask_pyramid(tmp_path / f"{sid}_Mask.tif", mask0, rounding=rounding)
        ref = ref_compute_evaluation_mask(path, 0.243)
        ours = evaluation_mask(tumour_mask_from_tiff(path, (w, h), slide_id=sid), 0.243)
        np.testing.assert_array_equal(ours, ref)  # pixel for pixel, shape included
        assert itc_labels(ours, 0.243).tolist() == ref_itc_list(ref, 0.243)
        old = averaged_downsample_tumour(path, (w, h))
        assert not np.array_equal(old[: ref.shape[0], : ref.shape[1]], ref > 0)  # it drifted
        det = edge_and_random_detections(rng, ref, (w, h), 6, 4, x_from=x_from, y_from=y_from)
        row = make_slide(tmp_path, sid, "tumor", wh=(w, h), mpp=0.243, detections=det)
        rows.append({**row, "annotation": str(path)})
        official[sid] = (ref, ref_itc_list(ref, 0.243))
        old_labels = evaluation_mask(old, 0.243)
        old_slides.append(
            match_detections(sid, det[:, 0], det[:, 1:], old_labels,
                             itc_labels(old_labels, 0.243), is_tumour=True)
        )  # fmt: skip
    det = np.column_stack([np.round(rng.random(4), 3), rng.integers(0, 4000, (4, 2))])
    rows.append(make_slide(tmp_path, "normal", "normal", wh=(4000, 4000), detections=det))
    old_slides.append(match_detections("normal", det[:, 0], det[:, 1:], None, [], is_tumour=False))
    m = run(tmp_path, write_sheet(tmp_path, rows), bootstrap=0)

    fp_lists, tp_lists, counts = [], [], []
    for row in rows:
        probs, xs, ys = ref_read_csv(tmp_path / "cohort" / "submission" / f"{row['slide_id']}.csv")
        mask, itc = official.get(row["slide_id"], (0, []))
        fp, tp, n = ref_fp_tp_probs(ys, xs, probs, row["label"] == "tumor", mask, itc)
        fp_lists.append(fp)
        tp_lists.append(tp)
        counts.append(n)
    fps, sens = ref_froc(fp_lists, tp_lists, len(rows), counts)
    froc = pd.read_csv(tmp_path / "cohort" / "froc.csv")
    np.testing.assert_array_equal(froc["fp_per_slide"], fps)
    np.testing.assert_array_equal(froc["sensitivity"], sens)
    ref = ref_score(fps, sens)
    old = cohort_froc(old_slides)["score"]
    assert abs(m["froc"] - ref) < 1e-9 and m["n_lesions"] == sum(counts)
    assert abs(old - ref) > 1e-3
    print(  # pytest -s shows it
        f"\nodd-sized mask TIFFs ({', '.join(ODD_MASKS)}): FROC new {m['froc']:.6f}, "
        f"official transcription {ref:.6f}, old (averaged downsample) {old:.6f}; "
        f"|new - official| = {abs(m['froc'] - ref):.3g}, |old - official| = {abs(old - ref):.4f}"
    )


def test_tumour_mask_from_a_camelyon16_mask_tiff(tmp_path):
    mask0 = np.zeros((1536, 2048), np.uint8)
    mask0[320:640, 512:1024] = 255
    mask0[992:1088, 96:160] = 1  # non-zero counts as tumour
    path = write_mask_pyramid(tmp_path / "t_Mask.tif", mask0)
    got = tumour_mask_from_tiff(path, (2048, 1536))
    want = np.zeros((48, 64), bool)
    want[10:20, 16:32] = True
    want[31:34, 3:5] = True
    np.testing.assert_array_equal(got, want)
    # only 2 levels (downsample 1 and 2): sampled at the cell centres of the level read
    path2 = write_mask_pyramid(tmp_path / "t2_Mask.tif", mask0, levels=2)
    np.testing.assert_array_equal(tumour_mask_from_tiff(path2, (2048, 1536)), want)
    # a slide one pixel larger: not its mask
    with pytest.raises(SlideError, match="the mask is 2048x1536 px, the slide 2049x1536 px"):
        tumour_mask_from_tiff(path, (2049, 1536), slide_id="t")


# -- the stage on files ----------------------------------------------------------------------------
def asap_xml(polygons: list[np.ndarray], groups: list[str] | None = None) -> str:
    """ASAP XML text of level-0 (x, y) polygons, written by hand (independent of the writer)."""
    groups = groups or ["_0"] * len(polygons)
    anns = []
    for k, (poly, g) in enumerate(zip(polygons, groups, strict=True)):
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x:.4f}" Y="{y:.4f}" />' for i, (x, y) in enumerate(poly)
        )
        anns.append(
            f'<Annotation Name="Annotation {k}" Type="Polygon" PartOfGroup="{g}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    grp = "".join(
        f'<Group Name="{g}" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>'
        for g in sorted(set(groups))
    )
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(anns)
        + f"</Annotations><AnnotationGroups>{grp}</AnnotationGroups></ASAP_Annotations>"
    )


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def make_slide(
    root: Path,
    sid: str,
    label: str,
    *,
    wh=(3200, 3200),
    mpp=0.243,
    polygons=None,
    detections=(),
    score=None,
    checksum="m1",
):
    """results/<sid>/{probmap.h5 (attrs), lesions.csv, score.json} and <sid>.xml; a sheet row."""
    res = root / "results" / sid
    res.mkdir(parents=True)
    with h5py.File(res / "probmap.h5", "w") as f:
        f.create_dataset("prob", data=np.zeros((4, 4), np.float32))
        f.attrs.update(
            {
                "stride_px": 16,
                "mpp": mpp,
                "slide_width": wh[0],
                "slide_height": wh[1],
                "slide_id": sid,
                "model_checksum": checksum,
                "wsiscan_version": __version__,
                "threshold": 0.5,
            }
        )
    det = np.asarray(detections, dtype=np.float64).reshape(-1, 3)
    det = det[np.argsort(-det[:, 0], kind="stable")]
    write_lesions_csv(res / "lesions.csv", det)
    sc = float(det[:, 0].max()) if score is None and len(det) else (score or 0.0)
    (res / "score.json").write_text(
        json.dumps({"slide_id": sid, "score": sc, "model_checksum": checksum})
    )
    ann = ""
    if polygons is not None:
        ann = f"ann/{sid}.xml"
        (root / "ann").mkdir(exist_ok=True)
        (root / ann).write_text(asap_xml(polygons))
    return {"slide_id": sid, "path": f"slides/{sid}.tif", "annotation": ann, "label": label}


def write_sheet(root: Path, rows: list[dict], split="test") -> Path:
    df = pd.DataFrame([{**r, "split": r.get("split", split)} for r in rows])
    path = root / "slides.tsv"
    df[["slide_id", "path", "annotation", "label", "split"]].to_csv(path, sep="\t", index=False)
    return path


def run(root: Path, sheet: Path, submission: Path | None = None, **kw):
    kw.setdefault("bootstrap", 50)
    return evaluate(
        sheet,
        None,
        EvaluateParams(**kw),
        results_dir=root / "results",
        out_dir=root / "cohort",
        base_dir=root,
        submission=submission,
    )


def hand_cohort(root: Path) -> Path:
    # tumour slide: a large lesion (cells 10..40 x 10..50) and a tiny ITC at cell (80, 80)
    big = rect(320, 320, 1600, 1280)
    itc = rect(80 * 32 - 16, 80 * 32 - 16, 81 * 32 + 16, 81 * 32 + 16)  # 2 x 2 cells
    rows = [
        make_slide(
            root,
            "tumor_a",
            "tumor",
            polygons=[big, itc],
            detections=[
                (0.9, 80 * 32 + 10, 80 * 32 + 10),
                (0.6, 600, 600),
                (0.8, 1000, 700),
                (0.7, 3000, 100),
            ],
        ),  # fmt: skip
        make_slide(root, "normal_b", "normal", detections=[(0.5, 100, 100), (0.65, 900, 900)]),
        make_slide(root, "normal_c", "normal", detections=[], score=0.2),
        make_slide(root, "Test_049", "tumor", polygons=[big], detections=[(0.99, 5, 5)]),
        {"slide_id": "unk", "path": "x.tif", "annotation": "", "label": "unknown"},
        {
            "slide_id": "trainee",
            "path": "x.tif",
            "annotation": "",
            "label": "normal",
            "split": "train",
        },
    ]
    return write_sheet(root, rows)


def test_evaluate_cohort_writes_every_output(tmp_path):
    sheet = hand_cohort(tmp_path)
    m = run(tmp_path, sheet, exclude=["Test_049", "Test_114"])
    out = tmp_path / "cohort"
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["n_slides"] == 4 and m["n_tumor"] == 2 and m["n_normal"] == 2
    assert m["excluded"] == ["Test_049"] and m["n_froc_slides"] == 3
    assert m["n_lesions"] == 1 and m["n_itc"] == 1
    assert m["model_checksums"] == ["m1"] and m["wsiscan_version"] == __version__
    # FPs: 0.7 (tumour slide), 0.5, 0.65 (normal); TP 0.8f; the ITC hit 0.9 is ignored
    froc = pd.read_csv(out / "froc.csv")
    assert list(froc.columns) == ["fp_per_slide", "sensitivity", "threshold"]
    np.testing.assert_allclose(froc["fp_per_slide"], [1, 2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(froc["sensitivity"], [1, 1, 1, 1, 0])
    assert m["froc"] == pytest.approx(1.0)
    assert m["sensitivity_at_fp"] == {
        k: pytest.approx(1.0) for k in ("0.25", "0.5", "1", "2", "4", "8")
    }
    slides = pd.read_csv(out / "slides.csv")
    assert list(slides.columns[:8]) == [
        "slide_id", "label", "score", "n_lesions", "n_detections", "tp", "fp", "itc_hits",
    ]  # fmt: skip
    row = slides.set_index("slide_id").loc["tumor_a"]
    assert (row["n_lesions"], row["n_detections"], row["tp"], row["fp"], row["itc_hits"]) == (
        1, 4, 1, 1, 1,
    )  # fmt: skip
    assert not slides.set_index("slide_id").loc["Test_049", "in_froc"]
    # AUC over all four labelled slides (excluded ones included), as scikit-learn gives it
    from sklearn.metrics import roc_auc_score

    assert m["auc"] == roc_auc_score([1, 0, 0, 1], [0.9, 0.65, 0.2, 0.99])
    roc = pd.read_csv(out / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert len(m["auc_ci95"]) == 2 and m["auc_ci95"][0] <= m["auc_ci95"][1]
    for png in ("froc.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sub = sorted(p.name for p in (out / "submission").iterdir())
    assert sub == ["Test_049.csv", "normal_b.csv", "normal_c.csv", "tumor_a.csv"]
    lines = (out / "submission" / "tumor_a.csv").read_text().splitlines()
    assert lines[0] == "0.9,2570,2570" and len(lines) == 4
    assert (out / "submission" / "normal_c.csv").read_text() == ""
    # no temporary file or folder left (they are hidden: .<name>.<host>.<pid>.<hex>.tmp)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert not list((out / "submission").glob(".*.tmp"))


def test_evaluate_cohort_matches_the_official_algorithm_on_its_submission(tmp_path):
    """The reference reads the submission CSVs like the official script and must agree."""
    from wsiscan.annotations import rasterize, read_asap_xml

    rng = np.random.default_rng(7)
    rows, meta = [], {}
    for k in range(6):
        sid = f"s{k}"
        mpp = float(rng.choice([0.243, 0.5]))
        wh = (int(rng.integers(3000, 8000)), int(rng.integers(3000, 8000)))
        shape = eval_mask_shape(wh)
        tumour = k < 4
        polys = random_tumour_mask(rng, shape, 3, mpp)[1] if tumour else None
        if tumour:  # at least one lesion that survives rasterisation
            polys.append(rect(wh[0] / 3, wh[1] / 3, wh[0] / 3 + 900, wh[1] / 3 + 700))
        conf, xs, ys = random_detections(rng, shape, np.ones(shape, bool), 15)
        xs, ys = np.minimum(xs, wh[0] - 1), np.minimum(ys, wh[1] - 1)
        det = np.column_stack([conf, xs, ys])
        rows.append(
            make_slide(tmp_path, sid, "tumor" if tumour else "normal", wh=wh, mpp=mpp,
                       polygons=polys, detections=det)
        )  # fmt: skip
        meta[sid] = (mpp, wh, tumour)
    m = run(tmp_path, write_sheet(tmp_path, rows), bootstrap=0)
    fp_lists, tp_lists, counts = [], [], []
    for sid, (mpp, wh, tumour) in meta.items():
        probs, xs, ys = ref_read_csv(tmp_path / "cohort" / "submission" / f"{sid}.csv")
        if tumour:
            anns = read_asap_xml(tmp_path / "ann" / f"{sid}.xml")
            mask = ref_evaluation_mask(rasterize(anns, eval_mask_shape(wh), 32), mpp)
            itc = ref_itc_list(mask, mpp)
        else:
            mask, itc = 0, []
        fp, tp, n = ref_fp_tp_probs(ys, xs, probs, tumour, mask, itc)
        fp_lists.append(fp)
        tp_lists.append(tp)
        counts.append(n)
    fps, sens = ref_froc(fp_lists, tp_lists, len(meta), counts)
    froc = pd.read_csv(tmp_path / "cohort" / "froc.csv")
    np.testing.assert_array_equal(froc["fp_per_slide"], fps)
    np.testing.assert_array_equal(froc["sensitivity"], sens)
    assert m["froc"] == ref_score(fps, sens)
    assert m["n_lesions"] == sum(counts)


def test_evaluate_cohort_uses_each_slides_mpp(tmp_path):
    """The same polygons: two lesions at 0.5 um/px but one at 0.25 um/px (merged by growth)."""
    a = rect(320, 640, 960, 1280)  # 20 x 20 cells
    b = rect(960 + 6 * 32, 640, 960 + 6 * 32 + 640, 1280)  # 6 cells to the right
    det = [(0.9, 600, 900), (0.8, 1500, 900)]
    rows = [
        make_slide(tmp_path, "t25", "tumor", mpp=0.25, polygons=[a, b], detections=det),
        make_slide(tmp_path, "t50", "tumor", mpp=0.5, polygons=[a, b], detections=det),
    ]
    run(tmp_path, write_sheet(tmp_path, rows), bootstrap=0)
    slides = pd.read_csv(tmp_path / "cohort" / "slides.csv").set_index("slide_id")
    assert slides.loc["t25", "n_lesions"] == 1 and slides.loc["t25", "tp"] == 1
    assert slides.loc["t50", "n_lesions"] == 2 and slides.loc["t50", "tp"] == 2


def test_evaluate_cohort_one_class_and_missing_outputs(tmp_path):
    rows = [
        make_slide(tmp_path, "n1", "normal", detections=[(0.4, 10, 10)]),
        make_slide(tmp_path, "n2", "normal", detections=[]),
        {"slide_id": "n3", "path": "x.tif", "annotation": "", "label": "normal"},  # no results
    ]
    sheet = write_sheet(tmp_path, rows)
    with pytest.raises(SlideError, match="n3"):
        run(tmp_path, sheet)
    m = run(tmp_path, sheet, allow_missing=True)
    assert [d["slide_id"] for d in m["missing"]] == ["n3"]
    assert m["auc"] is None and m["froc"] is None and m["auc_ci95"] is None
    assert any("AUC undefined" in w for w in m["warnings"])
    assert any("FROC undefined" in w for w in m["warnings"])
    assert pd.read_csv(tmp_path / "cohort" / "froc.csv").empty
    assert (tmp_path / "cohort" / "roc.png").is_file()


def test_evaluate_cohort_bootstrap_is_seeded(tmp_path):
    sheet = hand_cohort(tmp_path)
    a = run(tmp_path, sheet, bootstrap=40, seed=5)
    b = run(tmp_path, sheet, bootstrap=40, seed=5)
    assert a["auc_ci95"] == b["auc_ci95"] and a["froc_ci95"] == b["froc_ci95"]
    assert a["bootstrap"]["n"] == 40 and 0 < a["bootstrap"]["n_valid_auc"] <= 40


def test_cli_evaluate(tmp_path, capsys, monkeypatch):
    from wsiscan.cli import main

    sheet = hand_cohort(tmp_path)
    monkeypatch.chdir(tmp_path)  # annotation paths in the sheet are relative to the working dir
    args = ["evaluate", "--sheet", str(sheet), "--results-dir", "results", "--out-dir", "cohort"]
    args += ["--split", "test", "--interpolation", "nearest", "--bootstrap", "10", "--seed", "1"]
    args += ["--fp-on-negative-only", "--exclude"]
    assert main(args) == 0
    m = json.loads((tmp_path / "cohort" / "metrics.json").read_text())
    assert m["config"]["exclude"] == [] and m["config"]["interpolation"] == "nearest"
    assert m["config"]["fp_on_negative_only"] is True and m["n_froc_slides"] == 4
    (tmp_path / "results" / "normal_c" / "score.json").unlink()
    assert main(args) == 1
    assert "normal_c" in capsys.readouterr().err
    assert main([*args, "--allow-missing"]) == 0


def test_oracle_maps_of_demo_slides_score_perfectly(tmp_path):
    """detect + evaluate on maps that equal the demo cohort's own annotations: every non-ITC
    lesion found, no FP, the synthetic ITC-sized lesions are exactly the ITC regions."""
    from wsiscan.annotations import rasterize, write_asap_xml
    from wsiscan.detect import detect
    from wsiscan.synth import plan_slide

    rows, kinds = [], []
    for k in range(5):
        sid, label = f"demo_{k}", "tumor" if k < 3 else "normal"
        plan = plan_slide(sid, label, 2018, 7000, 5000, 0.5)
        kinds += [les.kind for les in plan.lesions]
        (tmp_path / "ann").mkdir(exist_ok=True)
        write_asap_xml(tmp_path / "ann" / f"{sid}.xml", plan.annotations())
        stride = 16
        shape = (-(-plan.height_px // stride), -(-plan.width_px // stride))
        tumour = rasterize(plan.annotations(), shape, stride)
        res = tmp_path / "results" / sid
        res.mkdir(parents=True)
        with h5py.File(res / "probmap.h5", "w") as f:
            f["prob"] = np.where(tumour, 0.95, 0.02).astype(np.float32)
            f["mask"] = tumour.astype(np.uint8)
            f.attrs.update(
                {
                    "stride_px": stride,
                    "mpp": plan.mpp,
                    "slide_width": plan.width_px,
                    "slide_height": plan.height_px,
                    "slide_id": sid,
                    "model_checksum": "oracle",
                    "threshold": 0.5,
                }
            )
        outs = [res / n for n in ("lesions.csv", "score.json", "lesions.geojson", "lesions.xml")]
        detect(res / "probmap.h5", *outs, DetectParams(nms_radius_um=200.0), slide_id=sid)
        rows.append(
            {"slide_id": sid, "path": "x.tif", "annotation": f"ann/{sid}.xml", "label": label}
        )
    m = run(tmp_path, write_sheet(tmp_path, rows), bootstrap=20)
    assert m["froc"] == 1.0 and m["auc"] == 1.0
    assert m["n_itc"] == kinds.count("itc") > 0
    assert m["n_lesions"] == len(kinds) - kinds.count("itc") > 0
    slides = pd.read_csv(tmp_path / "cohort" / "slides.csv")
    assert slides["fp"].sum() == 0 and slides["tp"].sum() == m["n_lesions"]


# -- detection CSVs, the submission folder, annotation inputs --------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("confidence,x,y\n0.9,10,20\n0.5,3.7,4\n", [(0.9, 10, 20), (0.5, 3, 4)]),
        ("Confidence,X,Y\n0.9,10,20\n", [(0.9, 10, 20)]),
        ("0.9,10,20\n0.5,3,4\n", [(0.9, 10, 20), (0.5, 3, 4)]),  # Camelyon16: no header
        ("\ufeff0.9, 10 ,20\r\n\n", [(0.9, 10, 20)]),  # BOM, spaces, CRLF, a blank line
        ("confidence,x,y\n", []),  # header only
        ("", []),  # 0 bytes: a slide without detections
        ("\n\n", []),
    ],
    ids=["header", "header-caps", "no-header", "bom-crlf", "header-only", "empty", "blank"],
)
def test_lesions_csv_forms(tmp_path, text, want):
    from wsiscan.formats.lesions import read_lesions_csv

    path = tmp_path / "l.csv"
    path.write_bytes(text.encode())
    df = read_lesions_csv(path, "s")
    assert list(df.columns) == ["confidence", "x", "y"]
    assert [df[c].dtype for c in df.columns] == [np.float64, np.int64, np.int64]
    assert [tuple(r) for r in df.itertuples(index=False)] == want


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("score,x,y\n0.9,1,2\n", "columns must be confidence,x,y"),
        ("0.9,1,2,3\n", "hold 3 values"),
        ("0.9,1\n", "hold 3 values"),
        ("0.9,1,2\n0.5,x,2\n", "non-numeric"),
        ("nan,1,2\n", "NaN or infinite confidence"),
        ("0.9,1e300,2\n", "is not a pixel"),
        ("0.9,1,nan\n", "is not a pixel"),
    ],
)
def test_bad_lesions_csv(tmp_path, text, cause):
    from wsiscan.formats.lesions import read_lesions_csv

    path = tmp_path / "l.csv"
    path.write_text(text)
    with pytest.raises(SlideError, match=cause) as info:
        read_lesions_csv(path, "s7")
    assert "s7" in str(info.value) and "l.csv" in str(info.value)


def test_evaluate_reads_its_own_submission_folder(tmp_path, monkeypatch):
    """The Camelyon16 submission one evaluation writes (header-less, 0-byte files for slides
    without detections), evaluated by ``wsiscan evaluate --submission``, gives the same metrics."""
    from wsiscan.cli import main

    m1 = run(tmp_path, hand_cohort(tmp_path), bootstrap=30, seed=3)
    sub = tmp_path / "cohort" / "submission"
    assert (sub / "normal_c.csv").stat().st_size == 0
    assert (sub / "tumor_a.csv").read_text().splitlines()[0] == "0.9,2570,2570"
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--sheet", "slides.tsv", "--results-dir", "results", "--bootstrap", "30"]
    args += ["--seed", "3", "--exclude"]
    assert main([*args, "--out-dir", "again", "--submission", "cohort/submission"]) == 0
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m1.pop("lesions_from") == "results" and m2.pop("lesions_from") == "cohort/submission"
    assert m2 == json.loads(json.dumps(m1))
    for name in ("froc.csv", "roc.csv", "slides.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "cohort" / name).read_bytes()
    for csv in sub.iterdir():
        assert (tmp_path / "again" / "submission" / csv.name).read_bytes() == csv.read_bytes()
    # a slide missing from the submission names its file; the folder this run writes is refused
    (tmp_path / "again" / "submission" / "normal_b.csv").unlink()
    with pytest.raises(SlideError, match=r"normal_b.*normal_b.csv.*not found"):
        run(tmp_path, tmp_path / "slides.tsv", submission=tmp_path / "again" / "submission")
    with pytest.raises(ConfigError, match="is the one this evaluation writes"):
        run(tmp_path, tmp_path / "slides.tsv", submission=sub)


def test_allow_missing_lists_a_slide_with_a_malformed_annotation(tmp_path):
    big = rect(320, 320, 1600, 1280)
    rows = [
        make_slide(tmp_path, "t1", "tumor", polygons=[big], detections=[(0.8, 600, 600)]),
        make_slide(tmp_path, "t2", "tumor", polygons=[big], detections=[(0.7, 600, 600)]),
        make_slide(tmp_path, "n1", "normal", detections=[(0.5, 100, 100)]),
    ]
    (tmp_path / "ann" / "t2.xml").write_text("<ASAP_Annotations><Annotations><Annotation")
    sheet = write_sheet(tmp_path, rows)
    with pytest.raises(SlideError, match=r"slide 't2' \(.*t2.xml\): malformed annotation XML"):
        run(tmp_path, sheet)
    m = run(tmp_path, sheet, allow_missing=True)
    assert [d["slide_id"] for d in m["missing"]] == ["t2"]
    assert "malformed annotation XML" in m["missing"][0]["cause"]
    assert m["n_slides"] == 2 and m["n_froc_slides"] == 2 and m["froc"] == 1.0
    assert list(pd.read_csv(tmp_path / "cohort" / "slides.csv")["slide_id"]) == ["t1", "n1"]


def slide_with_annotation(root: Path, text: str | bytes, suffix: str = ".xml", **kw) -> Path:
    """A one-tumour-slide cohort whose annotation file holds ``text``; returns its sheet."""
    row = make_slide(root, "t1", "tumor", detections=[(0.8, 600, 600)], **kw)
    path = root / f"t1{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return write_sheet(root, [{**row, "annotation": path.name}])


SQUARE = [(320, 320), (1600, 320), (1600, 1280), (320, 1280)]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<ASAP_Annotations><Annotations/></ASAP_Annotations>", ["holds no polygon"]),
        (asap_xml([rect(320, 320, 1600, 1280)], ["metastases"]),
         ["groups found: ['metastases']", "annotation.tumour_groups"]),
        (asap_xml([np.array([[320, 320], [1e300, 320], [1600, 1280]])]), ["far outside"]),
        (asap_xml([np.array([[320, 320], [1e18, 320], [1600, 1280]])]), ["far outside"]),
        (asap_xml([np.array([[320, 320], [7000, 320], [1600, 1280]])]), ["far outside"]),
    ],
    ids=["empty", "camelyon17-groups", "1e300", "1e18", "finite-far"],
)  # fmt: skip
def test_silently_wrong_ground_truth_stops_the_evaluation(tmp_path, text, words):
    sheet = slide_with_annotation(tmp_path, text)
    with pytest.raises(SlideError) as info:
        run(tmp_path, sheet)
    message = str(info.value)
    for word in ("slide 't1'", "t1.xml", *words):
        assert word in message, message


def test_camelyon17_groups_and_qupath_geojson_by_the_group_settings(tmp_path):
    from wsiscan.evaluate import tumour_mask_from_annotation

    big = rect(320, 320, 1600, 1280)
    sheet = slide_with_annotation(tmp_path, asap_xml([big], ["metastases"]))
    m = run(tmp_path, sheet, tumour_groups=["metastases"], bootstrap=0)
    slides = pd.read_csv(tmp_path / "cohort" / "slides.csv")
    assert m["n_lesions"] == 1 and slides["tp"].tolist() == [1]
    assert m["config"]["tumour_groups"] == ["metastases"]
    # the same lesion as QuPath GeoJSON, once with a hole around the detection: the hole is cut
    # out of the tumour mask, and the evaluation mask fills it (official binary_fill_holes)
    ring = [[float(x), float(y)] for x, y in [*SQUARE, SQUARE[0]]]
    hole = [[480.0, 480.0], [800.0, 480.0], [800.0, 800.0], [480.0, 800.0], [480.0, 480.0]]
    for geometry in (
        {"type": "Polygon", "coordinates": [ring, hole]},
        {"type": "MultiPolygon", "coordinates": [[ring]]},
    ):
        feature = {"type": "Feature", "geometry": geometry,
                   "properties": {"classification": {"name": "Tumor"}}}  # fmt: skip
        doc = json.dumps({"type": "FeatureCollection", "features": [feature]})
        root = tmp_path / geometry["type"]
        root.mkdir()
        m = run(root, slide_with_annotation(root, doc, ".geojson"), bootstrap=0)
        slides = pd.read_csv(root / "cohort" / "slides.csv")
        assert m["n_lesions"] == 1 and slides["tp"].tolist() == [1]
        tumour = tumour_mask_from_annotation(root / "t1.geojson", (3200, 3200), slide_id="t1")
        want = np.zeros((100, 100), bool)
        want[10:40, 10:50] = True
        if geometry["type"] == "Polygon":
            want[15:25, 15:25] = False
        np.testing.assert_array_equal(tumour, want)


def test_a_tiff_that_is_not_a_mask_stops_the_evaluation(tmp_path):
    """The slide itself (RGB), a grey image with many values, an empty mask of a tumour slide."""
    rng = np.random.default_rng(0)
    wh = (1024, 768)
    cases = {
        "rgb": (rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8), "a colour image"),
        "grey": (rng.integers(0, 255, (768, 1024), dtype=np.uint8), "distinct grey values"),
        "empty": (np.zeros((768, 1024), np.uint8), "holds no tumour (non-zero) pixel"),
    }
    for name, (image, cause) in cases.items():
        root = tmp_path / name
        root.mkdir()
        row = make_slide(root, "t1", "tumor", wh=wh, detections=[(0.8, 600, 600)])
        path = write_mask_pyramid(root / "t1_Mask.tif", image)
        sheet = write_sheet(root, [{**row, "annotation": path.name}])
        with pytest.raises(SlideError, match=f"slide 't1' .*t1_Mask.tif.*{re.escape(cause)}"):
            run(root, sheet)
    # a mask whose pyramid averaged a binary mask: few pixels between 0 and 255 are fine
    mask0 = np.zeros((768, 1024), np.uint8)
    mask0[100:400, 200:700] = 255
    lvl5 = mask0[::32, ::32].copy()
    lvl5[3, 6:22] = np.arange(16) * 16 + 1  # 16 more values on one edge row
    got = check_label_image(np.dstack([lvl5] * 3 + [np.full_like(lvl5, 255)]), Path("m"), "t", 5)
    assert np.array_equal(got, lvl5)


def test_metrics_per_centre_are_each_centres_own_cohort(tmp_path):
    """metrics.json's ``centres``: each centre's figures equal an evaluation of its slides alone;
    a sheet without the column gives none."""
    hand_cohort(tmp_path)
    sheet = pd.read_csv(tmp_path / "slides.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["centre"] = sheet["slide_id"].map({"tumor_a": "X", "normal_b": "X", "normal_c": "Y",
                                             "Test_049": "Y"}).fillna("")  # fmt: skip
    sheet.to_csv(tmp_path / "slides.tsv", sep="\t", index=False)
    m = run(tmp_path, tmp_path / "slides.tsv", bootstrap=0)
    assert sorted(m["centres"]) == ["X", "Y"]
    assert pd.read_csv(tmp_path / "cohort" / "slides.csv")["centre"].tolist()[:2] == ["X", "X"]
    for centre in ("X", "Y"):
        alone = sheet[sheet["centre"] == centre].drop(columns="centre")
        alone.to_csv(tmp_path / f"{centre}.tsv", sep="\t", index=False)
        own = run(tmp_path, tmp_path / f"{centre}.tsv", bootstrap=0)
        assert own["centres"] == {}  # no centre column
        got = m["centres"][centre]
        for key in ("n_slides", "n_tumor", "n_normal", "auc", "froc", "sensitivity_at_fp",
                    "fp_per_normal_slide", "n_lesions"):  # fmt: skip
            assert got[key] == own[key], (centre, key)
    assert m["centres"]["X"]["n_slides"] == 2 and m["centres"]["X"]["froc"] is not None
