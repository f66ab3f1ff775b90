"""ScanNet model: layer layout, geometry, normalisation, torchvision weights, checkpoints, CLI."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from wsiscan.cli import main as cli_main
from wsiscan.errors import CheckpointError, WsiscanError
from wsiscan.fileio import sha256_file
from wsiscan.formats.checkpoint import load_checkpoint, save_checkpoint
from wsiscan.geometry import Geometry
from wsiscan.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ScanNet,
    init_model,
    load_torchvision_vgg16,
    to_tensor,
    tumour_probability,
)
from wsiscan.params import InitModelParams

# torchvision's VGG16 / VGG16-BN `features` indices of the 13 convolutions (fixed by its source)
TV_VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
TV_VGG16_BN_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def randomise(model: ScanNet, seed: int = 0) -> ScanNet:
    """Random BatchNorm statistics/affine and a larger classifier so outputs are not tiny."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
        model.head.fc8.weight.mul_(50.0)
    return model


def fake_torchvision_state(batchnorm: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict with torchvision VGG16(-BN)'s keys and shapes (classifier as cheap views)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    in_ch = 3
    for idx, out_ch in zip(
        TV_VGG16_BN_CONVS if batchnorm else TV_VGG16_CONVS, VGG16_CHANNELS, strict=True
    ):
        state[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * 0.05
        state[f"features.{idx}.bias"] = torch.randn(out_ch, generator=g) * 0.1
        if batchnorm:
            state[f"features.{idx + 1}.weight"] = torch.rand(out_ch, generator=g) + 0.5
            state[f"features.{idx + 1}.bias"] = torch.randn(out_ch, generator=g) * 0.1
            state[f"features.{idx + 1}.running_mean"] = torch.randn(out_ch, generator=g) * 0.1
            state[f"features.{idx + 1}.running_var"] = torch.rand(out_ch, generator=g) + 0.5
            state[f"features.{idx + 1}.num_batches_tracked"] = torch.tensor(7)
        in_ch = out_ch
    # torchvision's classifier: right shapes, stored as zero-stride views (a few bytes on disk)
    for key, shape in {
        "classifier.0.weight": (4096, 25088),
        "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096),
        "classifier.3.bias": (4096,),
        "classifier.6.weight": (1000, 4096),
        "classifier.6.bias": (1000,),
    }.items():
        state[key] = torch.zeros(1).expand(*shape)
    return state


# -- layout and geometry -------------------------------------------------------------------------
def test_geometry_derived_from_layers_matches_grid_geometry():
    model = ScanNet(width=0.125)
    assert (model.Lf, model.Sf) == (244, 32)
    geo = model.geometry(82, 2)
    assert geo == Geometry.for_arch("vgg16", 82, 2)
    assert (geo.Lr, geo.Lp, geo.Sr, geo.Sd, geo.block_side, geo.tile_side) == (
        2868,
        83,
        2656,
        16,
        2884,
        166,
    )


@pytest.mark.parametrize("batchnorm", [True, False])
def test_trunk_keys_follow_torchvision_layout(batchnorm):
    model = ScanNet(width=1.0, batchnorm=batchnorm)
    convs = TV_VGG16_BN_CONVS if batchnorm else TV_VGG16_CONVS
    state = model.state_dict()
    for idx, ch in zip(convs, VGG16_CHANNELS, strict=True):
        weight = state[f"features.{idx}.weight"]
        assert weight.shape[0] == ch and weight.shape[2:] == (3, 3)
        if batchnorm:
            assert state[f"features.{idx + 1}.running_var"].shape == (ch,)
    assert state["head.fc6.weight"].shape == (1024, 512, 2, 2)
    assert state["head.fc7.weight"].shape == (1024, 1024, 1, 1)
    assert state["head.fc8.weight"].shape == (2, 1024, 1, 1)
    assert ("head.fc8_bn.weight" in state) is False
    assert ("head.fc7_bn.weight" in state) is batchnorm
    # every padding is 0
    assert all(m.padding == (0, 0) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_width_scales_channels_but_keeps_two_classes():
    model = ScanNet(width=0.125)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32] + [64] * 6 + [128, 128, 2]
    tiny = ScanNet(width=0.001, batchnorm=False)
    assert [c.out_channels for c in tiny.modules() if isinstance(c, torch.nn.Conv2d)][-1] == 2
    assert min(c.out_channels for c in tiny.modules() if isinstance(c, torch.nn.Conv2d)) == 1


def test_output_sides_and_invalid_inputs():
    model = ScanNet(width=0.125).eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 244, 244)).shape == (1, 2, 1, 1)
        assert model(torch.zeros(2, 3, 244 + 3 * 32, 244 + 32)).shape == (2, 2, 4, 2)
        assert model.forward_dense(torch.zeros(1, 3, 276 + 16, 276 + 16), 2).shape == (1, 2, 4, 4)
        assert model.forward_dense(torch.zeros(1, 3, 276 + 24, 276 + 24), 4).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="alpha=3"):
        model.dense_plan(3)
    with pytest.raises(ValueError, match="unknown architecture"):
        ScanNet(arch="resnet")
    with pytest.raises(ValueError, match="width"):
        ScanNet(width=0)


def test_dense_plan_dilates_after_the_anchor_pools():
    model = ScanNet(width=0.125)
    names = [spec.name for spec in model.layers]
    plan = dict(zip(names, model.dense_plan(4), strict=True))
    assert plan["pool3"] == (2, 1)
    assert plan["pool4"] == (1, 1)
    assert plan["conv5_1"] == (1, 2)
    assert plan["pool5"] == (1, 2)
    assert plan["fc6"] == (1, 4)
    plan2 = dict(zip(names, model.dense_plan(2), strict=True))
    assert plan2["pool4"] == (2, 1) and plan2["pool5"] == (1, 1) and plan2["fc6"] == (1, 2)
    assert all(
        p == (spec.stride, 1) for p, spec in zip(model.dense_plan(1), model.layers, strict=True)
    )


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = randomise(ScanNet(width=0.125, dropout=0.5))
    x = torch.randn(2, 3, 244, 244)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    out1 = model(x)
    torch.manual_seed(2)
    out2 = model(x)
    assert not torch.equal(out1, out2)
    out1.sum().backward()  # the in-place ReLUs keep autograd valid
    assert model.features[0].weight.grad is not None


def test_tumour_probability_is_softmax_channel_one():
    logits = torch.tensor([[[[0.0]], [[np.log(3.0)]]]])
    assert tumour_probability(logits).shape == (1, 1, 1)
    assert tumour_probability(logits).item() == pytest.approx(0.75)


def test_tumour_probability_ignores_threads_and_batch():
    """The same logit gives the same probability, bit for bit, whatever the number of threads and
    wherever it lies in the batch (torch's own CPU softmax does not: a thread's last elements
    take a scalar exp); and it is the softmax to float32 rounding."""
    logits = torch.randn(5, 2, 97, 131, generator=torch.Generator().manual_seed(0)) * 6
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tumour_probability(logits)
        torch.set_num_threads(3)
        three = tumour_probability(logits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three) and one.dtype == torch.float32
    for i in range(len(logits)):
        assert torch.equal(tumour_probability(logits[i : i + 1])[0], one[i])
    shifted = tumour_probability(logits.flatten(2)[:, :, 7:].reshape(5, 2, -1, 1))  # other offsets
    assert torch.equal(shifted[..., 0], one.flatten(1)[:, 7:])
    torch.testing.assert_close(one, torch.softmax(logits, dim=1)[:, 1], rtol=1e-6, atol=1e-7)


# -- normalisation -------------------------------------------------------------------------------
def test_to_tensor_normalises_with_imagenet_stats():
    rgb = np.zeros((2, 4, 5, 3), np.uint8)
    rgb[1] = 255
    x = to_tensor(rgb)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), -mean / std, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 3, 4].numpy(), (1 - mean) / std, rtol=1e-6)
    x64 = to_tensor(torch.from_numpy(rgb[0]), dtype=torch.float64)
    assert x64.shape == (1, 3, 4, 5) and x64.dtype == torch.float64
    with pytest.raises(TypeError):
        to_tensor(rgb.astype(np.float32))
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 5, 4), np.uint8))


# -- torchvision ImageNet weights ----------------------------------------------------------------
def test_load_torchvision_vgg16_bn_into_bn_model(tmp_path):
    fake = fake_torchvision_state(batchnorm=True)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(fake, path)
    model = ScanNet(width=1.0, batchnorm=True)
    head_before = model.head.fc6.weight.clone()
    loaded = load_torchvision_vgg16(model, path)
    expected = {k for k in fake if k.startswith("features.")}
    assert set(loaded) == expected
    state = model.state_dict()
    for key in expected:
        assert torch.equal(state[key], fake[key]), key
    assert torch.equal(model.head.fc6.weight, head_before)  # head keeps its init


def test_load_torchvision_vgg16_into_bn_and_plain_models(tmp_path):
    fake = fake_torchvision_state(batchnorm=False)
    path = tmp_path / "vgg16.pth"
    torch.save({"state_dict": fake}, path)  # a wrapped state dict is accepted too
    plain = ScanNet(width=1.0, batchnorm=False)
    assert set(load_torchvision_vgg16(plain, path)) == {
        k for k in fake if k.startswith("features.")
    }
    assert torch.equal(plain.features[28].weight, fake["features.28.weight"])
    with_bn = ScanNet(width=1.0, batchnorm=True)
    loaded = load_torchvision_vgg16(with_bn, path)
    assert len(loaded) == 26 and "features.40.weight" in loaded  # convs only
    assert torch.equal(with_bn.features[40].weight, fake["features.28.weight"])


def test_vgg16_bn_folds_into_a_model_without_batchnorm(tmp_path):
    path = tmp_path / "vgg16_bn.pth"
    torch.save(fake_torchvision_state(batchnorm=True), path)
    with_bn, plain = ScanNet(batchnorm=True).eval(), ScanNet(batchnorm=False).eval()
    load_torchvision_vgg16(with_bn, path)
    load_torchvision_vgg16(plain, path)
    x = to_tensor(np.random.default_rng(0).integers(0, 256, (1, 212, 212, 3), dtype=np.uint8))
    with torch.inference_mode():
        a, b = with_bn.features(x), plain.features(x)
    assert a.shape == (1, 512, 1, 1)
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_torchvision_weights_errors(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(fake_torchvision_state(batchnorm=False), path)
    with pytest.raises(CheckpointError, match="width 1"):
        load_torchvision_vgg16(ScanNet(width=0.125), path)
    partial = {k: v for k, v in fake_torchvision_state(False).items() if k != "features.28.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="13 convolutions"):
        load_torchvision_vgg16(ScanNet(), tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="file not found"):
        load_torchvision_vgg16(ScanNet(), tmp_path / "missing.pth")


# -- checkpoints ---------------------------------------------------------------------------------
class _Payload:
    """Anything that is not a plain type: weights_only loading must refuse it."""


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = randomise(ScanNet(width=0.125)).eval()
    path = tmp_path / "sub" / "model.pt"
    meta = {"epochs": 2, "loss": np.float32(0.25), "slides": ["a", "b"], "round": 1}
    sha = save_checkpoint(path, model, meta)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["arch"] == "vgg16" and raw["config"]["geometry"] == {"Lf": 244, "Sf": 32}
    assert raw["config"]["meta"] == {"epochs": 2, "loss": 0.25, "slides": ["a", "b"], "round": 1}
    loaded, config = load_checkpoint(path)
    assert not loaded.training
    assert (config["width"], config["batchnorm"], config["wsiscan_version"]) == (
        0.125,
        True,
        raw["config"]["wsiscan_version"],
    )
    x = torch.randn(1, 3, 276, 276)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    # saving is deterministic: same model, same bytes
    assert save_checkpoint(tmp_path / "again.pt", loaded, meta) == sha
    with pytest.raises(TypeError, match="plain types"):
        save_checkpoint(tmp_path / "bad.pt", model, {"obj": _Payload()})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_checkpoint_refuses_pickle_and_mismatches(tmp_path):
    model = ScanNet(width=0.125)
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, {})
    raw = torch.load(good, weights_only=True)

    evil = tmp_path / "evil.pt"
    torch.save({**raw, "extra": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True.*_Payload") as err:
        load_checkpoint(evil)
    assert str(evil) in str(err.value) and isinstance(err.value, WsiscanError)

    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"state_dict": {}, "config": _Payload()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain_pickle)

    wrong_width = tmp_path / "wrong_width.pt"
    torch.save(
        {"state_dict": raw["state_dict"], "config": {**raw["config"], "width": 0.25}}, wrong_width
    )
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(wrong_width)

    wrong_bn = tmp_path / "wrong_bn.pt"
    torch.save(
        {"state_dict": raw["state_dict"], "config": {**raw["config"], "batchnorm": False}}, wrong_bn
    )
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(wrong_bn)

    other_arch = tmp_path / "other_arch.pt"
    torch.save(
        {"state_dict": raw["state_dict"], "config": {**raw["config"], "arch": "resnet50"}},
        other_arch,
    )
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet50'"):
        load_checkpoint(other_arch)

    wrong_geo = tmp_path / "wrong_geo.pt"
    cfg = {**raw["config"], "geometry": {"Lf": 224, "Sf": 32}}
    torch.save({"state_dict": raw["state_dict"], "config": cfg}, wrong_geo)
    with pytest.raises(CheckpointError, match="Lf=224"):
        load_checkpoint(wrong_geo)

    bare = tmp_path / "bare.pt"
    torch.save(raw["state_dict"], bare)
    with pytest.raises(CheckpointError, match="not a wsiscan checkpoint"):
        load_checkpoint(bare)

    text = tmp_path / "text.pt"
    text.write_text("not a model\n")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)


def test_init_model_cli_random_and_imagenet(tmp_path, capsys):
    out = tmp_path / "model.pt"
    argv = ["init_model", "--out-model", str(out), "--width", "0.125", "--seed", "5"]
    assert cli_main(argv) == 0
    model, config = load_checkpoint(out)
    assert config["width"] == 0.125 and config["meta"]["seed"] == 5
    assert config["meta"]["init"] == "random"
    again = init_model(tmp_path / "again.pt", InitModelParams(width=0.125, seed=5))
    assert again["sha256"] == sha256_file(out)  # same seed, same file
    other = init_model(tmp_path / "other.pt", InitModelParams(width=0.125, seed=6))
    assert other["sha256"] != again["sha256"]

    weights = tmp_path / "vgg16.pth"
    torch.save(fake_torchvision_state(batchnorm=False), weights)
    out2 = tmp_path / "imagenet.pt"
    assert (
        cli_main(
            [
                "init_model",
                "--out-model",
                str(out2),
                "--no-batchnorm",
                "--imagenet-weights",
                str(weights),
            ]
        )
        == 0
    )
    model2, config2 = load_checkpoint(out2)
    assert config2["batchnorm"] is False and config2["meta"]["init"] == "imagenet"
    assert config2["meta"]["imagenet_sha256"] == sha256_file(weights)
    assert torch.equal(
        model2.features[0].weight, torch.load(weights, weights_only=True)["features.0.weight"]
    )

    # a user error prints one line and exits 1
    code = cli_main(
        [
            "init_model",
            "--out-model",
            str(tmp_path / "x.pt"),
            "--width",
            "0.5",
            "--imagenet-weights",
            str(weights),
        ]
    )
    assert code == 1
    assert "width 1" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
