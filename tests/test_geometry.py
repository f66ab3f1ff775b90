"""The scan geometry is derived from the layer list, and its stride rules hold."""

from __future__ import annotations

import pytest

from wsiscan.geometry import Geometry, LayerSpec, output_side, receptive_field, vgg16_layers


def test_vgg16_patch_side_and_stride_are_derived():
    assert receptive_field(vgg16_layers()) == (244, 32)


def test_paper_values():
    geo = Geometry.for_arch("vgg16", n=82, alpha=1)
    assert (geo.Lr, geo.Lp, geo.Sr, geo.Sd) == (2868, 83, 2656, 32)
    assert Geometry.for_roi_side("vgg16", 2868) == geo


@pytest.mark.parametrize("alpha", [1, 2, 4])
def test_dense_block_and_tile(alpha):
    geo = Geometry.for_arch("vgg16", n=5, alpha=alpha)
    assert geo.Sd * alpha == geo.Sf
    assert geo.block_side == geo.Lr + (alpha - 1) * geo.Sd
    assert geo.tile_side == alpha * geo.Lp
    # a tile of alpha*Lp cells at stride Sd spans exactly one ROI stride: tiles abut
    assert geo.tile_side * geo.Sd == geo.Sr
    # the last output of a block is the patch starting at (tile_side - 1) * Sd: it fits the block
    assert (geo.tile_side - 1) * geo.Sd + geo.Lf == geo.block_side
    # cell centres fall on patch centres
    assert geo.origin + geo.Lf / 2 == pytest.approx(geo.Sd / 2)


def test_every_valid_roi_side_maps_to_n_plus_one():
    layers = vgg16_layers()
    for n in range(6):
        assert output_side(layers, 244 + 32 * n) == n + 1
    assert output_side(layers, 250) is None
    assert output_side(layers, 200) is None


def test_invalid_roi_side_and_alpha_are_refused():
    with pytest.raises(ValueError, match="not Lf \\+ n\\*Sf"):
        Geometry.for_roi_side("vgg16", 2860)
    with pytest.raises(ValueError, match="alpha"):
        Geometry.for_arch("vgg16", n=2, alpha=3)
    with pytest.raises(ValueError, match="unknown architecture"):
        Geometry.for_arch("resnet", n=2)


def test_other_trunk_gets_its_own_geometry():
    slim = [
        LayerSpec("conv", 3),
        LayerSpec("pool", 2, 2),
        LayerSpec("conv", 3),
        LayerSpec("pool", 2, 2),
        LayerSpec("conv", 2),
    ]
    geo = Geometry.from_layers(slim, n=3, alpha=2)
    assert (geo.Lf, geo.Sf) == (14, 4)
    assert output_side(slim, geo.Lr) == geo.Lp == 4


def test_attrs_round_trip_and_checksum():
    geo = Geometry.for_arch("vgg16", n=7, alpha=4)
    attrs = geo.as_attrs() | {"geometry_checksum": geo.checksum()}
    assert Geometry.from_attrs(attrs) == geo
    attrs["geometry_checksum"] = "0" * 16
    with pytest.raises(ValueError, match="checksum mismatch"):
        Geometry.from_attrs(attrs)
    assert Geometry.for_arch("vgg16", n=7, alpha=2).checksum() != geo.checksum()
