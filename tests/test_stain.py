"""Stain variation (issue 17): HED augmentation and Macenko normalisation on rendered demo
tissue (the synthetic generator's centres A and C: the same tissue in two stains)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import hed_from_rgb

from wsiscan.stain import (
    StainFit,
    StainMap,
    draw_hed,
    hed_perturb,
    macenko_fit,
    od_of,
    reference_fit,
    stained_pixels,
)
from wsiscan.synth import SlideRenderer, plan_slide

SLIDE, SEED, W, H, MPP = "unit_tumor_03", 5, 4001, 3001, 0.5
REGION = ((1500, 1000), (384, 384))  # level-0 xy and size: tissue with nuclei and stroma


@pytest.fixture(scope="module")
def tiles() -> dict[str, np.ndarray]:
    """The same tissue region rendered in the demo's centres A (training) and C (held out)."""
    out = {}
    for centre in ("A", "C"):
        plan = plan_slide(SLIDE, "tumor", SEED, W, H, MPP, size_jitter=0.0, centre=centre)
        out[centre] = SlideRenderer(plan).render(*REGION)
    return out


def test_hed_augmentation_keeps_the_range_and_is_deterministic_per_seed(tiles):
    rgb = tiles["A"]
    outs = [hed_perturb(rgb, *draw_hed(np.random.default_rng(s), 0.3, 0.1)) for s in (1, 1, 2)]
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert outs[0].tobytes() == outs[1].tobytes()  # the same seed, the same patch
    assert outs[0].tobytes() != outs[2].tobytes()
    # zero strength gives the patch back exactly; white glass stays white without a shift
    assert np.array_equal(hed_perturb(rgb, *draw_hed(np.random.default_rng(0), 0.0, 0.0)), rgb)
    white = np.full((4, 4, 3), 255, np.uint8)
    assert np.array_equal(hed_perturb(white, np.array([1.3, 0.7, 1.2]), np.zeros(3)), white)
    # the perturbation is the HED one: each deconvolved stain c becomes c * alpha + beta
    alpha, beta = np.array([1.25, 0.8, 1.0]), np.array([0.05, -0.03, 0.0])
    out = hed_perturb(rgb, alpha, beta)

    def stains(x: np.ndarray) -> np.ndarray:
        return -np.log((x.reshape(-1, 3).astype(np.float64) + 1) / 256) @ hed_from_rgb

    unclipped = (out.reshape(-1, 3) > 2).all(axis=1) & (out.reshape(-1, 3) < 253).all(axis=1)
    want = stains(rgb)[unclipped] * alpha + beta
    err = np.abs(stains(out)[unclipped] - want)[:, :2]  # H and E (the residual is tiny)
    assert unclipped.mean() > 0.9 and np.median(err) < 0.01


def test_macenko_maps_a_stain_shifted_tile_back_near_the_reference(tiles):
    reference = reference_fit([stained_pixels(tiles["A"])])
    source = macenko_fit(stained_pixels(tiles["C"]))
    assert StainFit.from_dict(reference.as_dict()).he_od == pytest.approx(reference.he_od)
    mapped = StainMap(source, reference)(tiles["C"])
    assert mapped.dtype == np.uint8 and mapped.shape == tiles["C"].shape
    want, before, after = (od_of(t) for t in (tiles["A"], tiles["C"], mapped))
    # mean optical density per channel, and per pixel (the same tissue in both centres)
    assert np.abs(before.mean(0) - want.mean(0)).max() > 0.07
    assert np.abs(after.mean(0) - want.mean(0)).max() < 0.04
    assert np.abs(after - want).mean() < 0.5 * np.abs(before - want).mean()
    # the map is per pixel: a block normalised whole equals its parts normalised one by one
    norm = StainMap(source, reference)
    parts = np.concatenate([norm(tiles["C"][:, :100]), norm(tiles["C"][:, 100:])], axis=1)
    assert np.array_equal(parts, mapped)


def test_a_fit_needs_stained_pixels():
    with pytest.raises(ValueError, match="stained pixels"):
        macenko_fit(np.full((10, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="he_od"):
        StainFit.from_dict({"max_conc": [1.0, 1.0]})


def test_a_centre_changes_the_stain_and_scanner_not_the_tissue(tiles):
    from wsiscan.errors import ConfigError

    plans = {c: plan_slide(SLIDE, "tumor", SEED, W, H, MPP, size_jitter=0.0, centre=c)
             for c in ("", "A", "C")}  # fmt: skip
    for c in ("A", "C"):
        assert plans[c].annotations() == plans[""].annotations()
        assert np.array_equal(plans[c].sd_um, plans[""].sd_um)
    assert plans[""].blur_px == 0 and plans["C"].jpeg_quality < plans["A"].jpeg_quality
    assert not np.allclose(plans["C"].h_od, plans["A"].h_od)
    assert np.abs(od_of(tiles["C"]).mean(0) - od_of(tiles["A"]).mean(0)).max() > 0.07
    with pytest.raises(ConfigError, match="unknown demo centre 'Z'"):
        plan_slide(SLIDE, "tumor", SEED, W, H, MPP, centre="Z")
