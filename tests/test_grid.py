"""ROI grid: block selection from a mask, exact coverage fractions, rois.h5 format and checks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsiscan.cli import main
from wsiscan.errors import ConfigError, SlideError
from wsiscan.formats.rois import ATTRS, FORMAT, RoiGrid, read_rois, write_rois
from wsiscan.formats.tissue_mask import read_tissue_mask, write_tissue_mask
from wsiscan.geometry import Geometry
from wsiscan.grid import block_grid, roi_grid
from wsiscan.params import RoiGridParams, TissueMaskParams
from wsiscan.tissue import tissue_mask

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
GEO = Geometry.for_arch("vgg16", n=2, alpha=2)  # Lr 308, Sr 96, block 324, origin -114


def _level0_raster(mask: np.ndarray, ds: tuple[float, float], wh: tuple[int, int], sub: int):
    """The mask drawn at ``sub`` samples per level-0 px over the slide (rational downsamples)."""
    rx, ry = round(ds[0] * sub), round(ds[1] * sub)
    assert math.isclose(rx, ds[0] * sub) and math.isclose(ry, ds[1] * sub)
    big = np.repeat(np.repeat(mask, ry, axis=0), rx, axis=1)
    out = np.zeros((wh[1] * sub, wh[0] * sub), bool)
    h, w = min(out.shape[0], big.shape[0]), min(out.shape[1], big.shape[1])
    out[:h, :w] = big[:h, :w]
    return out


def _brute_fractions(raster: np.ndarray, sub: int, sr: int, shape: tuple[int, int]) -> np.ndarray:
    """Tissue share of each coverage square [bx*Sr, (bx+1)*Sr) x ..., counted sample by sample."""
    rows, cols = shape
    pad = np.zeros((rows * sr * sub, cols * sr * sub), bool)
    pad[: raster.shape[0], : raster.shape[1]] = raster
    counts = pad.reshape(rows, sr * sub, cols, sr * sub).sum(axis=(1, 3))
    return counts / float((sr * sub) ** 2)


def _random_blobs(shape: tuple[int, int], seed: int, density: float = 0.15) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random(shape), 2.0)
    return field > np.quantile(field, 1 - density)


# -- hand-made masks -----------------------------------------------------------------------------
def test_geometry_of_the_small_grid():
    assert (GEO.Sr, GEO.block_side, GEO.origin, GEO.tile_side) == (96, 324, -114, 6)


def test_hand_made_mask_integer_downsample():
    """Slide 500 x 300 px (not a multiple of Sr = 96): 6 x 4 blocks; mask at downsample 16."""
    mask = np.zeros((19, 32), bool)  # ceil(300/16), ceil(500/16)
    mask[0, 0] = True  # [0,16)^2 -> block (0, 0)
    mask[5, 11] = True  # x [176,192), y [80,96) -> block (1, 0)
    mask[6, 12] = True  # x [192,208), y [96,112) -> block (2, 1)
    mask[18, 31] = True  # x [496,500) (slide ends at 500), y [288,300) -> block (5, 3)
    res = block_grid(mask, (16.0, 16.0), (500, 300), GEO)
    assert res.grid_shape == (4, 6)
    assert res.grid_xy.tolist() == [[0, 0], [1, 0], [2, 1], [5, 3]]  # row-major: by, then bx
    assert res.level0_xy.tolist() == [[-114, -114], [-18, -114], [78, -18], [366, 174]]
    expected = np.array([256, 256, 256, 4 * 12]) / 96**2
    np.testing.assert_allclose(res.tissue_fraction, expected, rtol=1e-6)
    assert res.level0_xy.dtype == np.int64 and res.tissue_fraction.dtype == np.float32


def test_hand_made_mask_fractional_downsample():
    """Downsample 12.5: mask pixel 7 spans x [87.5, 100), across the block border at 96."""
    mask = np.zeros((24, 40), bool)  # 300 / 12.5, 500 / 12.5
    mask[2, 7] = True  # y [25, 37.5)
    mask[16, 36] = True  # x [450, 462.5), y [200, 212.5) -> block (4, 2) only
    mask[20, 38] = True  # x [475, 487.5), y [250, 262.5) -> blocks (4, 2) and (5, 2)
    res = block_grid(mask, (12.5, 12.5), (500, 300), GEO)
    assert res.grid_xy.tolist() == [[0, 0], [1, 0], [4, 2], [5, 2]]
    np.testing.assert_allclose(
        res.tissue_fraction * 96**2, [8.5 * 12.5, 4 * 12.5, (12.5 + 5) * 12.5, 7.5 * 12.5]
    )


def test_touching_a_block_border_is_not_overlap():
    """A mask pixel that ends exactly on a coverage border does not select the next block."""
    mask = np.zeros((3, 3), bool)
    mask[0, 1] = True  # ds 48: x [48, 96) ends on the border of block 1
    res = block_grid(mask, (48.0, 48.0), (144, 144), GEO)
    assert res.grid_xy.tolist() == [[0, 0]]
    assert res.tissue_fraction.tolist() == [pytest.approx(0.25)]


def test_different_downsample_same_tissue_same_blocks():
    """The same level-0 tissue rectangle at downsample 4 and 32 gives the same blocks."""
    fine = np.zeros((100, 160), bool)
    fine[24:48, 40:112] = True  # level-0 x [160, 448), y [96, 192)
    coarse = np.zeros((13, 20), bool)
    coarse[3:6, 5:14] = True  # same rectangle at downsample 32
    a = block_grid(fine, (4, 4), (640, 400), GEO)
    b = block_grid(coarse, (32, 32), (640, 400), GEO)
    assert a.grid_xy.tolist() == b.grid_xy.tolist()
    np.testing.assert_allclose(a.tissue_fraction, b.tissue_fraction, rtol=1e-6)
    assert a.grid_xy.tolist() == [[1, 1], [2, 1], [3, 1], [4, 1]]


def test_min_tissue_fraction_drops_low_blocks():
    mask = np.zeros((19, 32), bool)
    mask[0, 0] = True  # block (0,0): 256/9216 = 0.028
    mask[6:12, 6:12] = True  # x,y [96,192): block (1,1) fully tissue
    all_ = block_grid(mask, (16, 16), (500, 300), GEO)
    assert all_.grid_xy.tolist() == [[0, 0], [1, 1]]
    kept = block_grid(mask, (16, 16), (500, 300), GEO, min_tissue_fraction=0.5)
    assert kept.grid_xy.tolist() == [[1, 1]]
    assert kept.tissue_fraction.tolist() == [1.0]
    none = block_grid(mask, (16, 16), (500, 300), GEO, min_tissue_fraction=1.0)
    assert none.grid_xy.tolist() == [[1, 1]]  # >= is inclusive
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        block_grid(mask, (16, 16), (500, 300), GEO, min_tissue_fraction=1.5)


def test_empty_mask_zero_blocks():
    res = block_grid(np.zeros((10, 10), bool), (50, 50), (480, 470), GEO)
    assert res.n_blocks == 0
    assert res.level0_xy.shape == (0, 2) and res.grid_xy.shape == (0, 2)
    assert res.tissue_fraction.shape == (0,)
    assert res.grid_shape == (5, 5)


# -- properties against a brute-force count ------------------------------------------------------
@pytest.mark.parametrize(
    ("ds", "wh", "sub", "alpha"),
    [
        ((7.0, 5.0), (1000, 700), 1, 1),  # integer, anisotropic
        ((2.5, 2.5), (613, 389), 2, 2),  # fractional, odd slide size
        ((16.0, 16.0), (999, 1001), 1, 4),
    ],
)
def test_fractions_and_coverage_against_brute_force(ds, wh, sub, alpha):
    geo = Geometry.for_arch("vgg16", n=2, alpha=alpha)
    sr = geo.Sr
    shape = (math.ceil(wh[1] / ds[1]), math.ceil(wh[0] / ds[0]))
    mask = _random_blobs(shape, seed=int(ds[0] * 10), density=0.1)
    res = block_grid(mask, ds, wh, geo)
    raster = _level0_raster(mask, ds, wh, sub)
    brute = _brute_fractions(raster, sub, sr, res.grid_shape)

    # fractions are exact (area-weighted), blocks kept are exactly those holding tissue
    np.testing.assert_allclose(res.fraction_map, brute, atol=1e-6)
    by, bx = np.nonzero(brute > 0)
    assert res.grid_xy.tolist() == np.stack([bx, by], 1).tolist()
    assert 0 < res.n_blocks < res.grid_shape[0] * res.grid_shape[1]

    # every tissue sample lies in the output coverage of exactly one kept block
    cover = np.zeros((res.grid_shape[0] * sr * sub, res.grid_shape[1] * sr * sub), np.int32)
    for gx, gy in res.grid_xy:
        cover[gy * sr * sub : (gy + 1) * sr * sub, gx * sr * sub : (gx + 1) * sr * sub] += 1
    assert cover.max() == 1  # coverages of kept blocks never overlap
    assert np.all(cover[: raster.shape[0], : raster.shape[1]][raster] == 1)

    # blocks: top-left = origin + index * Sr; neighbouring coverages abut exactly
    np.testing.assert_array_equal(res.level0_xy, geo.origin + res.grid_xy * sr)
    coverage_start = res.level0_xy - geo.origin
    assert np.all(coverage_start % sr == 0)
    # the dense tile of a block (tile_side cells of Sd) is exactly its coverage
    assert geo.tile_side * geo.Sd == sr


def test_all_blocks_tile_the_slide_plane():
    """With an all-tissue mask every block is kept and the coverages tile [0, cols*Sr)^2."""
    res = block_grid(np.ones((9, 13), bool), (40, 40), (500, 350), GEO)
    rows, cols = res.grid_shape
    assert (rows, cols) == (4, 6)
    assert res.n_blocks == rows * cols
    cover = np.zeros((rows * 96, cols * 96), np.int32)
    for x, y in res.level0_xy - GEO.origin:
        cover[y : y + 96, x : x + 96] += 1
    assert np.all(cover == 1)
    # last row/column: partly outside the slide, fraction = the part inside
    frac = res.fraction_map
    assert frac[0, 0] == 1.0
    assert frac[0, -1] == pytest.approx((500 - 5 * 96) / 96)
    assert frac[-1, 0] == pytest.approx((350 - 3 * 96) / 96)


# -- rois.h5 -------------------------------------------------------------------------------------
def _write(path: Path, res, **kw):
    args = dict(
        slide_id="s1",
        slide_wh=(500, 300),
        mpp=0.5,
        mask_level=2,
        mask_downsample_xy=(16.0, 16.0),
        min_tissue_fraction=0.0,
    )
    args.update(kw)
    grid = RoiGrid(
        geometry=GEO,
        level0_xy=res.level0_xy,
        grid_xy=res.grid_xy,
        tissue_fraction=res.tissue_fraction,
        grid_shape=res.grid_shape,
        **args,
    )
    write_rois(path, grid)


def _no_temporary_files(folder: Path) -> bool:
    return not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def _grid(slide, mask, out, slide_id: str, **settings) -> dict:
    """Stage ``roi_grid`` with the config defaults except ``settings``; its summary."""
    return roi_grid(slide, mask, out, RoiGridParams(**settings), slide_id=slide_id)


def test_rois_h5_format_round_trip(tmp_path):
    mask = np.zeros((19, 32), bool)
    mask[3:9, 2:20] = True
    res = block_grid(mask, (16, 16), (500, 300), GEO)
    _write(tmp_path / "rois.h5", res)
    with h5py.File(tmp_path / "rois.h5", "r") as f:
        assert set(f.keys()) == {"level0_xy", "grid_xy", "tissue_fraction"}
        assert f["level0_xy"].dtype == np.int64 and f["level0_xy"].shape == (res.n_blocks, 2)
        assert f["grid_xy"].dtype == np.int64
        assert f["tissue_fraction"].dtype == np.float32
        for key, value in GEO.as_attrs().items():
            assert f.attrs[key] == value, key
        assert f.attrs["geometry_checksum"] == GEO.checksum()
        assert set(ATTRS) <= set(f.attrs)
        assert f.attrs["format"] == FORMAT
        assert list(f.attrs["grid_shape"]) == [4, 6]
    grid = read_rois(tmp_path / "rois.h5", "s1")
    np.testing.assert_array_equal(grid.level0_xy, res.level0_xy)
    np.testing.assert_array_equal(grid.grid_xy, res.grid_xy)
    np.testing.assert_array_equal(grid.tissue_fraction, res.tissue_fraction)
    assert grid.grid_shape == (4, 6) and grid.slide_id == "s1"
    assert grid.mask_downsample_xy[0] == 16.0 and grid.mpp == 0.5
    assert grid.geometry == GEO and Geometry.from_attrs(grid.attrs()) == GEO
    assert grid.n_blocks == res.n_blocks
    assert _no_temporary_files(tmp_path)


def test_empty_rois_file_is_valid(tmp_path):
    res = block_grid(np.zeros((19, 32), bool), (16, 16), (500, 300), GEO)
    _write(tmp_path / "rois.h5", res)
    grid = read_rois(tmp_path / "rois.h5")
    assert grid.level0_xy.shape == (0, 2) and grid.grid_xy.shape == (0, 2)
    assert grid.tissue_fraction.shape == (0,)
    assert grid.grid_shape == (4, 6) and grid.n_blocks == 0


def test_read_rois_rejects_bad_files(tmp_path):
    with pytest.raises(SlideError, match=r"slide 's1' \(.*missing.h5\): ROI grid file not found"):
        read_rois(tmp_path / "missing.h5", "s1")
    (tmp_path / "junk.h5").write_bytes(b"\x00" * 100)
    with pytest.raises(SlideError, match="'s1'.*junk.h5.*not a readable HDF5"):
        read_rois(tmp_path / "junk.h5", "s1")

    res = block_grid(np.ones((19, 32), bool), (16, 16), (500, 300), GEO)
    good = tmp_path / "good.h5"
    _write(good, res)
    with pytest.raises(SlideError, match="belongs to slide 's1'"):
        read_rois(good, "s2")

    tampered = tmp_path / "tampered.h5"
    _write(tampered, res)
    with h5py.File(tampered, "a") as f:
        f.attrs["geometry_checksum"] = "0" * 16
    with pytest.raises(SlideError, match="'s1'.*checksum mismatch"):
        read_rois(tampered)

    stale = tmp_path / "stale.h5"
    _write(stale, res)
    with h5py.File(stale, "a") as f:
        f.attrs["Sr"] = 95
    with pytest.raises(SlideError, match="disagree"):
        read_rois(stale)

    cut = tmp_path / "cut.h5"
    _write(cut, res)
    with h5py.File(cut, "a") as f:
        del f["grid_xy"]
    with pytest.raises(SlideError, match="lacks datasets grid_xy"):
        read_rois(cut)

    ragged = tmp_path / "ragged.h5"
    _write(ragged, res)
    with h5py.File(ragged, "a") as f:
        del f["tissue_fraction"]
        f["tissue_fraction"] = np.ones(3, np.float32)
    with pytest.raises(SlideError, match="shape"):
        read_rois(ragged)

    moved = tmp_path / "moved.h5"
    _write(moved, res)
    with h5py.File(moved, "a") as f:
        f["level0_xy"][0] = [0, 0]
    with pytest.raises(SlideError, match="level0_xy disagrees"):
        read_rois(moved)


# -- the stage on a real slide -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmu_mask_png(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmu_grid")
    tissue_mask(
        CMU, out / "tissue.png", out / "qc" / "tissue.png", TissueMaskParams(), slide_id="cmu"
    )
    return out / "tissue.png"


def test_empty_grid_is_written_with_a_warning(cmu_mask_png, tmp_path, caplog):
    """A mask without tissue: roi_grid writes a valid empty rois.h5 and warns."""
    mask, meta = read_tissue_mask(cmu_mask_png, "cmu")
    empty = tmp_path / "tissue.png"
    write_tissue_mask(empty, np.zeros_like(mask), {**meta, "tissue_fraction": 0.0})
    with caplog.at_level(logging.WARNING):
        summary = _grid(CMU, empty, tmp_path / "rois.h5", "cmu", n=2, alpha=2)
    assert "no tissue" in caplog.text
    assert summary["n_blocks"] == 0
    grid = read_rois(tmp_path / "rois.h5", "cmu")
    assert grid.level0_xy.shape == (0, 2) and grid.grid_xy.shape == (0, 2)
    assert grid.tissue_fraction.shape == (0,)
    assert grid.grid_shape == (31, 24)


def test_roi_grid_on_cmu_covers_all_tissue(cmu_mask_png, tmp_path):
    summary = _grid(CMU, cmu_mask_png, tmp_path / "rois.h5", "cmu", n=2, alpha=2)
    grid = read_rois(tmp_path / "rois.h5", "cmu")
    mask, meta = read_tissue_mask(cmu_mask_png)
    assert summary["n_blocks"] == grid.level0_xy.shape[0] > 0
    assert grid.grid_shape == (31, 24)  # ceil(2967/96), ceil(2220/96)
    assert grid.slide_wh == (2220, 2967)
    assert grid.mpp == pytest.approx(0.499) and grid.mask_level == 0
    # every tissue mask pixel (16 px square at level 0) lies in kept coverage
    kept = np.zeros(grid.grid_shape, bool)
    kept[grid.grid_xy[:, 1], grid.grid_xy[:, 0]] = True
    ii, jj = np.nonzero(mask)
    for corner_y, corner_x in ((0, 0), (15, 0), (0, 15), (15, 15)):
        y = np.minimum(ii * 16 + corner_y, 2966)
        x = np.minimum(jj * 16 + corner_x, 2219)
        assert kept[y // 96, x // 96].all()
    # area: the kept blocks hold all the tissue inside the slide (last row/column: partial px)
    px_w = np.minimum(16, 2220 - np.arange(mask.shape[1]) * 16)
    px_h = np.minimum(16, 2967 - np.arange(mask.shape[0]) * 16)
    tissue_area = (mask * np.outer(px_h, px_w)).sum()
    assert grid.tissue_fraction.sum() * 96**2 == pytest.approx(tissue_area, rel=1e-3)


def test_roi_grid_paper_geometry(cmu_mask_png, tmp_path):
    """n = 82 (Lr 2868, Sr 2656): the 2220 x 2967 slide is 2 rows x 1 column of blocks."""
    _grid(CMU, cmu_mask_png, tmp_path / "rois.h5", "cmu", n=82, alpha=2)
    grid = read_rois(tmp_path / "rois.h5")
    attrs = grid.attrs()
    assert (attrs["Lr"], attrs["Sr"], grid.grid_shape) == (2868, 2656, (2, 1))
    assert grid.grid_xy.tolist() == [[0, 0], [0, 1]]
    assert grid.level0_xy.tolist() == [[-114, -114], [-114, 2656 - 114]]


def test_roi_grid_rejects_a_mask_of_another_slide(cmu_mask_png, tmp_path):
    with pytest.raises(SlideError, match="belongs to slide 'cmu'"):
        _grid(CMU, cmu_mask_png, tmp_path / "r.h5", "other", n=2, alpha=2)
    # an invalid scan geometry (alpha 3) is refused when the stage's record is built
    with pytest.raises(ConfigError, match=r"scan\.alpha: must be one of \[1, 2, 4\], got 3"):
        RoiGridParams(n=2, alpha=3)
    assert not (tmp_path / "r.h5").exists()


def test_roi_grid_uses_the_resolution_resolved_by_tissue_mask(tmp_path, capsys):
    """A slide without a resolution: tissue_mask resolves slide.mpp_fallback once and records it
    as slide_mpp in tissue.png; roi_grid (which has no fallback of its own) takes the grid's mpp
    from there. (Replaces the old roi_grid --mpp-fallback.)"""
    import tifffile

    rgb = np.full((1200, 1600, 3), 243, np.uint8)
    rgb[300:900, 400:1200] = (232, 150, 192)
    slide = tmp_path / "nompp.tif"
    tifffile.imwrite(slide, rgb, tile=(256, 256), photometric="rgb", compression="jpeg")
    mask, qc, rois = tmp_path / "tissue.png", tmp_path / "qc.png", tmp_path / "rois.h5"
    with pytest.raises(SlideError, match="slide.mpp_fallback"):
        tissue_mask(slide, mask, qc, TissueMaskParams(), slide_id="nompp")
    tissue_mask(slide, mask, qc, TissueMaskParams(mpp_fallback=0.25), slide_id="nompp")
    assert read_tissue_mask(mask, "nompp")[1]["slide_mpp"] == 0.25
    assert "mpp_fallback" not in RoiGridParams.settings()
    summary = _grid(slide, mask, rois, "nompp", n=2, alpha=2)
    grid = read_rois(rois, "nompp")
    assert grid.mpp == 0.25 and summary["n_blocks"] == grid.n_blocks > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # only tissue_mask has --mpp-fallback
        main(["roi_grid", "--slide-id", "nompp", "--slide", str(slide), "--mask", str(mask),
              "--out-rois", str(tmp_path / "x.h5"), "--mpp-fallback", "0.5"])  # fmt: skip
    assert exit_.value.code == 2
    assert "unrecognized arguments: --mpp-fallback" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_roi_grid_cli(cmu_mask_png, tmp_path, capsys):
    out = tmp_path / "rois.h5"
    args = ["roi_grid", "--slide", str(CMU), "--slide-id", "cmu", "--mask", str(cmu_mask_png)]
    rc = main(
        [*args, "--out-rois", str(out), "--n", "20", "--alpha", "4", "--min-tissue-fraction", "0.2"]
    )
    assert rc == 0
    grid = read_rois(out, "cmu")
    attrs = grid.attrs()
    assert (attrs["n"], attrs["alpha"], grid.min_tissue_fraction) == (20, 4, 0.2)
    assert grid.tissue_fraction.min() >= 0.2
    rc = main([*args, "--out-rois", str(tmp_path / "x.h5"), "--n", "2", "--alpha", "2",
               "--slide", str(tmp_path / "gone.svs")])  # fmt: skip
    assert rc == 1
    assert "gone.svs" in capsys.readouterr().err
