"""Slide I/O on a real Aperio file through OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest

from wsiscan.errors import SlideError
from wsiscan.slide import check_slide_id, open_slide


def test_real_svs_opens_and_reads(cmu_svs):
    with open_slide(cmu_svs, slide_id="cmu") as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.level_count >= 1 and s.level_downsamples[0] == 1.0
        rgb = s.read_rgb((1000, 1000), 0, (64, 48))
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        assert rgb.std() > 5  # real tissue texture, not a blank read


def test_outside_the_slide_reads_white(cmu_svs):
    with open_slide(cmu_svs) as s:
        w, h = s.dimensions
        rgb = s.read_rgb((w - 10, h - 10), 0, (30, 30))
        assert (rgb[15:, :] == 255).all() and (rgb[:, 15:] == 255).all()
        assert (s.read_rgb((-50, -50), 0, (40, 40)) == 255).all()


def test_level_for_mpp_picks_nearest(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert s.level_for_mpp(8.0) == 0  # a single-level file
        assert s.level_mpp(0) == pytest.approx(s.mpp)


def test_missing_and_invalid_files_name_the_slide(tmp_path):
    with pytest.raises(SlideError, match=r"slide 'x' .*file not found"):
        open_slide(tmp_path / "nope.svs", slide_id="x")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideError, match=r"slide 'junk' .*junk\.tif"):
        open_slide(junk)


def test_slide_without_mpp_needs_a_fallback(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "nompp.tif"
    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        open_slide(path, slide_id="nompp")
    with open_slide(path, slide_id="nompp", mpp_fallback=0.25) as s:
        assert s.mpp == 0.25


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "a b", "", "x;rm"])
def test_slide_id_rules(bad):
    with pytest.raises(ValueError):
        check_slide_id(bad)
    assert check_slide_id("Test_001.v2-a") == "Test_001.v2-a"
