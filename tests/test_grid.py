"""ROI grid: block selection from a mask, exact coverage fractions, rois.h5 format and checks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsiscan.cli import main
from wsiscan.errors import SlideError
from wsiscan.geometry import Geometry
from wsiscan.grid import ROI_ATTRS, block_grid, compute_grid, read_rois, write_rois
from wsiscan.tissue import compute_tissue_mask, read_tissue_mask

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
    write_rois(path, res, GEO, **args)


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
        assert set(ROI_ATTRS) <= set(f.attrs)
        assert list(f.attrs["grid_shape"]) == [4, 6]
    arrays, attrs = read_rois(tmp_path / "rois.h5", "s1")
    np.testing.assert_array_equal(arrays["level0_xy"], res.level0_xy)
    np.testing.assert_array_equal(arrays["grid_xy"], res.grid_xy)
    np.testing.assert_array_equal(arrays["tissue_fraction"], res.tissue_fraction)
    assert attrs["grid_shape"] == (4, 6) and attrs["slide_id"] == "s1"
    assert attrs["mask_downsample_x"] == 16.0 and attrs["mpp"] == 0.5
    assert Geometry.from_attrs(attrs) == GEO
    assert not (tmp_path / "rois.h5.tmp").exists()


def test_empty_rois_file_is_valid(tmp_path, caplog):
    res = block_grid(np.zeros((19, 32), bool), (16, 16), (500, 300), GEO)
    with caplog.at_level(logging.WARNING):
        _write(tmp_path / "rois.h5", res)
    assert "no tissue" in caplog.text
    arrays, attrs = read_rois(tmp_path / "rois.h5")
    assert arrays["level0_xy"].shape == (0, 2) and arrays["grid_xy"].shape == (0, 2)
    assert arrays["tissue_fraction"].shape == (0,)
    assert attrs["grid_shape"] == (4, 6)


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
    compute_tissue_mask(CMU, "cmu", out / "tissue.png", out / "qc" / "tissue.png")
    return out / "tissue.png"


def test_compute_grid_on_cmu_covers_all_tissue(cmu_mask_png, tmp_path):
    summary = compute_grid(CMU, cmu_mask_png, tmp_path / "rois.h5", slide_id="cmu", n=2, alpha=2)
    arrays, attrs = read_rois(tmp_path / "rois.h5", "cmu")
    mask, meta = read_tissue_mask(cmu_mask_png)
    assert summary["n_blocks"] == arrays["level0_xy"].shape[0] > 0
    assert attrs["grid_shape"] == (31, 24)  # ceil(2967/96), ceil(2220/96)
    assert (attrs["slide_width"], attrs["slide_height"]) == (2220, 2967)
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["mask_level"] == 0
    # every tissue mask pixel (16 px square at level 0) lies in kept coverage
    kept = np.zeros(attrs["grid_shape"], bool)
    kept[arrays["grid_xy"][:, 1], arrays["grid_xy"][:, 0]] = True
    ii, jj = np.nonzero(mask)
    for corner_y, corner_x in ((0, 0), (15, 0), (0, 15), (15, 15)):
        y = np.minimum(ii * 16 + corner_y, 2966)
        x = np.minimum(jj * 16 + corner_x, 2219)
        assert kept[y // 96, x // 96].all()
    # area: the kept blocks hold all the tissue inside the slide (last row/column: partial px)
    px_w = np.minimum(16, 2220 - np.arange(mask.shape[1]) * 16)
    px_h = np.minimum(16, 2967 - np.arange(mask.shape[0]) * 16)
    tissue_area = (mask * np.outer(px_h, px_w)).sum()
    assert arrays["tissue_fraction"].sum() * 96**2 == pytest.approx(tissue_area, rel=1e-3)


def test_compute_grid_paper_geometry(cmu_mask_png, tmp_path):
    """n = 82 (Lr 2868, Sr 2656): the 2220 x 2967 slide is 2 rows x 1 column of blocks."""
    compute_grid(CMU, cmu_mask_png, tmp_path / "rois.h5", slide_id="cmu", n=82, alpha=2)
    arrays, attrs = read_rois(tmp_path / "rois.h5")
    assert (attrs["Lr"], attrs["Sr"], attrs["grid_shape"]) == (2868, 2656, (2, 1))
    assert arrays["grid_xy"].tolist() == [[0, 0], [0, 1]]
    assert arrays["level0_xy"].tolist() == [[-114, -114], [-114, 2656 - 114]]


def test_compute_grid_rejects_a_mask_of_another_slide(cmu_mask_png, tmp_path):
    with pytest.raises(SlideError, match="belongs to slide 'cmu'"):
        compute_grid(CMU, cmu_mask_png, tmp_path / "r.h5", slide_id="other", n=2, alpha=2)
    with pytest.raises(SlideError, match="invalid scan geometry"):
        compute_grid(CMU, cmu_mask_png, tmp_path / "r.h5", slide_id="cmu", n=2, alpha=3)
    assert not (tmp_path / "r.h5").exists()


def test_grid_cli(cmu_mask_png, tmp_path, capsys):
    out = tmp_path / "rois.h5"
    args = ["grid", "--slide", str(CMU), "--slide-id", "cmu", "--mask", str(cmu_mask_png)]
    rc = main(
        [*args, "--out", str(out), "--n", "20", "--alpha", "4", "--min-tissue-fraction", "0.2"]
    )
    assert rc == 0
    arrays, attrs = read_rois(out, "cmu")
    assert (attrs["n"], attrs["alpha"], attrs["min_tissue_fraction"]) == (20, 4, 0.2)
    assert arrays["tissue_fraction"].min() >= 0.2
    rc = main([*args, "--out", str(tmp_path / "x.h5"), "--n", "2", "--alpha", "2",
               "--slide", str(tmp_path / "gone.svs")])  # fmt: skip
    assert rc == 1
    assert "gone.svs" in capsys.readouterr().err
