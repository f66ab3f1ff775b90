"""Exactness of ScanNet's dense inference against the patch classifier.

Random weights, BatchNorm in eval mode with random running statistics, float64 and float32.
FCN on ``Lr = Lf + n*Sf`` == patch classifier at stride ``Sf``; shift-and-stitch (alpha 2, 4) ==
patch classifier at stride ``Sd``; single pass == shift-and-stitch. Tolerances are relative to the
largest logit. Full width runs at n = 1 (a 276 px ROI); slim widths (1/8) at larger n.
Where the float64 patch classifier is costly it is evaluated at a sample of cells that holds the
four corners and one cell of every shift phase (i, j).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiscan.dense import (
    block_n,
    dense_tiles,
    patch_classifier,
    shift_and_stitch,
    single_pass,
)
from wsiscan.model import ScanNet, to_tensor, tumour_probability

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def make_model(width: float, dtype: torch.dtype, seed: int = 0) -> ScanNet:
    """Random ScanNet in eval mode with random BN statistics and non-tiny logits."""
    torch.manual_seed(seed)
    model = ScanNet(width=width, batchnorm=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
        model.head.fc8.weight.mul_(50.0)
    return model.to(dtype).eval()


def make_blocks(side_hw: tuple[int, int], dtype: torch.dtype, batch: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (batch, *side_hw, 3), dtype=np.uint8)
    return to_tensor(rgb, dtype=dtype)


def assert_close(actual, reference, dtype: torch.dtype) -> None:
    actual = np.asarray(actual.cpu() if isinstance(actual, torch.Tensor) else actual)
    reference = np.asarray(reference)
    assert actual.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.1  # outputs of a meaningful size, so the relative check means something
    err = np.abs(actual - reference).max() / scale
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]:.0e}"


def sample_cells(tile_side: int, alpha: int, seed: int = 0) -> list[tuple[int, int]]:
    """The four corners plus one random cell of every shift phase (i, j)."""
    rng = np.random.default_rng(seed)
    last = tile_side - 1
    cells = {(0, 0), (0, last), (last, 0), (last, last)}
    for i in range(alpha):
        for j in range(alpha):
            r = i + alpha * int(rng.integers(0, tile_side // alpha))
            c = j + alpha * int(rng.integers(0, tile_side // alpha))
            cells.add((r, c))
    return sorted(cells)


def patch_logits_at(model, block, cells, sd):
    """Patch-classifier logits (N, 2) at tile cells (r, c): the Lf patch at offset (r*sd, c*sd)."""
    lf = model.Lf
    out = []
    for r, c in cells:
        crop = block[:, :, r * sd : r * sd + lf, c * sd : c * sd + lf]
        out.append(patch_classifier(model, crop, stride=lf, output="logits")[:, :, 0, 0])
    return np.stack(out, axis=1)  # (N, len(cells), 2)


def gather(tile_logits, cells):
    t = tile_logits.cpu().numpy()
    return np.stack([t[:, :, r, c] for r, c in cells], axis=1)


# -- FCN == patch classifier at stride Sf --------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_fcn_equals_patch_classifier_full_width(dtype):
    model = make_model(1.0, dtype)
    geo = model.geometry(n=1, alpha=1)
    roi = make_blocks((geo.Lr, geo.Lr), dtype)
    with torch.inference_mode():
        fcn = model(roi)
    assert fcn.shape == (1, 2, 2, 2)
    if dtype == torch.float32:
        ref = patch_classifier(model, roi, stride=geo.Sf, output="logits")
        assert_close(fcn, ref, dtype)
    else:  # float64 full width is slow on CPU: the two diagonal cells cover both offsets
        cells = [(0, 0), (1, 1)]
        assert_close(gather(fcn, cells), patch_logits_at(model, roi, cells, geo.Sf), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fcn_equals_patch_classifier_slim_rectangular(dtype):
    model = make_model(0.125, dtype, seed=1)
    h, w = 244 + 4 * 32, 244 + 2 * 32
    roi = make_blocks((h, w), dtype, batch=2, seed=1)
    with torch.inference_mode():
        fcn = model(roi)
    assert fcn.shape == (2, 2, 5, 3)
    ref = patch_classifier(model, roi, stride=32, output="logits")
    assert_close(fcn, ref, dtype)
    prob = patch_classifier(model, roi, stride=32)
    assert_close(tumour_probability(fcn), prob, dtype)


# -- shift-and-stitch == patch classifier at stride Sd -------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "n"), [(2, 2), (4, 1)])
def test_shift_and_stitch_equals_patch_classifier_slim(dtype, alpha, n):
    model = make_model(0.125, dtype, seed=2)
    geo = model.geometry(n=n, alpha=alpha)
    block = make_blocks((geo.block_side, geo.block_side), dtype, seed=alpha)
    dense = shift_and_stitch(model, block, alpha, output="logits")
    assert dense.shape == (1, 2, geo.tile_side, geo.tile_side)
    if dtype == torch.float32:
        ref = patch_classifier(model, block, stride=geo.Sd, output="logits")
        assert ref.shape == (1, 2, geo.tile_side, geo.tile_side)
        assert_close(dense, ref, dtype)
    else:
        cells = sample_cells(geo.tile_side, alpha, seed=n)
        assert_close(gather(dense, cells), patch_logits_at(model, block, cells, geo.Sd), dtype)
    # and the single pass gives the same tile
    assert_close(single_pass(model, block, alpha, output="logits"), dense.numpy(), dtype)


def test_single_pass_equals_patch_classifier_full_width_alpha2():
    dtype = torch.float32
    model = make_model(1.0, dtype, seed=3)
    geo = model.geometry(n=1, alpha=2)
    block = make_blocks((geo.block_side, geo.block_side), dtype, seed=3)
    single = single_pass(model, block, 2, output="logits")
    assert single.shape == (1, 2, 4, 4)
    shift = shift_and_stitch(model, block, 2, output="logits")
    assert_close(single, shift.numpy(), dtype)
    cells = sample_cells(geo.tile_side, 2, seed=3)
    assert_close(gather(single, cells), patch_logits_at(model, block, cells, geo.Sd), dtype)


# -- single pass == shift-and-stitch at larger n -------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [2, 4])
def test_single_pass_equals_shift_and_stitch_slim_larger_n(dtype, alpha):
    model = make_model(0.125, dtype, seed=4)
    geo = model.geometry(n=6, alpha=alpha)
    blocks = make_blocks((geo.block_side, geo.block_side), dtype, batch=2, seed=4)
    single = dense_tiles(model, blocks, alpha, mode="single", output="logits")
    shift = dense_tiles(model, blocks, alpha, mode="shift", output="logits")
    assert single.shape == (2, 2, geo.tile_side, geo.tile_side)
    assert_close(single, shift.numpy(), dtype)
    prob = dense_tiles(model, blocks, alpha)
    assert prob.shape == (2, geo.tile_side, geo.tile_side)
    np.testing.assert_allclose(prob.numpy(), tumour_probability(shift).numpy(), rtol=0, atol=1e-6)


# -- API behaviour -------------------------------------------------------------------------------
def test_dense_tiles_batch_alpha1_and_errors():
    model = make_model(0.125, torch.float32, seed=5)
    geo = model.geometry(n=2, alpha=1)
    blocks = make_blocks((geo.block_side, geo.block_side), torch.float32, batch=3, seed=5)
    tiles = dense_tiles(model, blocks, 1, mode="single")
    assert tiles.shape == (3, 3, 3)
    with torch.inference_mode():
        np.testing.assert_array_equal(tiles.numpy(), tumour_probability(model(blocks)).numpy())
    one = dense_tiles(model, blocks[1:2], 1, mode="shift")
    np.testing.assert_allclose(one[0].numpy(), tiles[1].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dense mode"):
        dense_tiles(model, blocks, 1, mode="fast")
    with pytest.raises(ValueError, match="block side 301"):
        dense_tiles(model, make_blocks((301, 301), torch.float32), 2)
    assert block_n(model, geo.block_side, 1) == 2
    assert block_n(model, 244 + 5 * 32 + 8 * 3, 4) == 5


def test_dense_runs_in_eval_mode_and_restores_training():
    model = make_model(0.125, torch.float32, seed=6)
    geo = model.geometry(n=1, alpha=2)
    block = make_blocks((geo.block_side, geo.block_side), torch.float32, seed=6)
    expected = single_pass(model, block, 2)
    model.train()
    running = model.features[1].running_mean.clone()
    got = single_pass(model, block, 2)
    assert model.training  # mode restored
    assert torch.equal(model.features[1].running_mean, running)  # BN statistics untouched
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
