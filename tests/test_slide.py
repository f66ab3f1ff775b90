"""Slide I/O on a real Aperio file through OpenSlide, and the direct level-0 tile reader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiscan import slide as slide_mod
from wsiscan.errors import SlideError
from wsiscan.params import SynthSlideParams
from wsiscan.slide import check_slide_id, open_slide
from wsiscan.synth import synth_slide

from .test_bad_input import damage_tile, he_image, write_tiff


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
    with open_slide(path, slide_id="nompp") as s:  # the resolution is resolved on first use
        assert s.dimensions == (512, 512)
        with pytest.raises(SlideError, match="no microns-per-pixel.*slide.mpp_fallback"):
            _ = s.mpp
    with open_slide(path, slide_id="nompp", mpp_fallback=0.25) as s:
        assert s.mpp == 0.25


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "a b", "", "x;rm"])
def test_slide_id_rules(bad):
    with pytest.raises(ValueError):
        check_slide_id(bad)
    assert check_slide_id("Test_001.v2-a") == "Test_001.v2-a"


# -- the direct level-0 reader ---------------------------------------------------------------------
def _regions(w: int, h: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Regions (x, y, width, height) of every kind: random, across each edge, outside, 1 px."""
    rng = np.random.default_rng(seed)
    fixed = [(-100, -50, 400, 300), (w - 300, h - 200, 500, 400), (w + 10, 0, 50, 50)]
    fixed += [(0, 0, 7, 5), (w // 2, h // 2, 1, 1), (0, h - 256, w, 256)]
    rand = [
        (int(rng.integers(-300, w)), int(rng.integers(-300, h)), *map(int, rng.integers(1, 900, 2)))
        for _ in range(n)
    ]
    return fixed + rand


def _assert_same_as_openslide(path: Path, seed: int) -> None:
    with open_slide(path, "s") as fast, open_slide(path, "s", direct_tiles=False) as ref:
        w, h = ref.dimensions
        for x, y, rw, rh in _regions(w, h, 25, seed):
            a, b = fast.read_rgb((x, y), 0, (rw, rh)), ref.read_rgb((x, y), 0, (rw, rh))
            assert np.array_equal(a, b), (path.name, x, y, rw, rh)
        assert fast.reads_tiles_directly and not ref.reads_tiles_directly


def test_direct_reader_equals_openslide_on_aperio_svs(cmu_svs):
    """Aperio SVS: RGB-coded JPEG tiles with shared JPEG tables."""
    _assert_same_as_openslide(cmu_svs, seed=1)


def test_direct_reader_equals_openslide_on_a_pyramidal_tiff(tmp_path):
    """The demo writer's pyramid: YCbCr 4:2:0 JPEG tiles, as Camelyon16's TIFFs."""
    tif, xml = tmp_path / "t.tif", tmp_path / "t.xml"
    params = SynthSlideParams(seed=3, width_px=1801, height_px=1701, mpp=0.5, size_jitter=0.0)
    synth_slide(tif, xml, params, slide_id="unit_tumor_01", label="tumor")
    _assert_same_as_openslide(tif, seed=2)


def test_other_layouts_are_read_through_openslide(tmp_path):
    """A tiled pyramid with zlib tiles: the direct reader steps aside, reads stay right."""
    rgb = he_image(600, 700, seed=4)
    path = tmp_path / "zlib.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate((1, 4)):
            res = 1e4 / (0.5 * f)
            tw.write(
                np.ascontiguousarray(rgb[::f, ::f]),
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if k else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    with open_slide(path, "z") as s:
        assert np.array_equal(s.read_rgb((0, 0), 0, (700, 600)), rgb)
        assert not s.reads_tiles_directly


def test_direct_reader_that_disagrees_steps_aside(tmp_path, monkeypatch, caplog):
    """The self-check at the first level-0 read: a decoder giving other pixels than OpenSlide is
    not used (a warning says so) and the reads come from OpenSlide."""
    path = write_tiff(tmp_path / "s.tif", he_image(512, 768, seed=5))
    real_read = slide_mod._DirectTiles.read

    def off_by_one(self, x0, y0, w, h):
        out = real_read(self, x0, y0, w, h)
        return None if out is None else out ^ np.uint8(1)

    monkeypatch.setattr(slide_mod._DirectTiles, "read", off_by_one)
    with caplog.at_level(logging.WARNING), open_slide(path, "s") as s:
        with open_slide(path, "s", direct_tiles=False) as ref:
            assert np.array_equal(
                s.read_rgb((5, 7), 0, (300, 200)), ref.read_rgb((5, 7), 0, (300, 200))
            )
        assert not s.reads_tiles_directly
    assert "differs from OpenSlide" in caplog.text and "s:" in caplog.text


def test_damaged_tile_through_the_direct_reader_names_the_region(tmp_path):
    path = write_tiff(tmp_path / "bad.tif", he_image(768, 1024, seed=6))
    damage_tile(path, (3, 2))  # level-0 x in [768, 1024), y in [512, 768); the centre is fine
    with open_slide(path, "bad") as s:
        s.read_rgb((300, 300), 0, (100, 100))
        assert s.reads_tiles_directly
        with pytest.raises(SlideError) as info:
            s.read_rgb((700, 500), 0, (200, 100))
    assert "level0_xy=(700, 500)" in str(info.value) and "bad.tif" in str(info.value)
