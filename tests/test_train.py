"""Training stages: training patch centres, the resumable prefetching trainer, hard-negative mining,
and the round DAG.

A small cohort of real OpenSlide-readable TIFFs is written once per module (0.5 um/px, 1280x1024):
two tumour slides with an annotated dark-purple tumour (with a ``_2`` exclusion cut out), one normal
slide with the same texture planted in its tissue and no annotation (a tumour mimic), and one plain
normal slide. Tissue masks and ROI grids come from the real stages.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from matplotlib.path import Path as MplPath

from wsiscan import cli
from wsiscan.annotations import Annotation, write_asap_xml
from wsiscan.formats.checkpoint import load_checkpoint, save_checkpoint
from wsiscan.formats.patches import read_patch_table
from wsiscan.formats.tissue_mask import read_tissue_mask
from wsiscan.grid import roi_grid
from wsiscan.model import ScanNet, to_tensor
from wsiscan.params import RoiGridParams, TissueMaskParams, TrainPatchesParams, TrainRoundParams
from wsiscan.patches import (
    TrainSlide,
    draw_patches,
    split_validation_slides,
    train_patches,
    training_slides,
    water_fill,
)
from wsiscan.slide import open_slide
from wsiscan.tissue import tissue_mask
from wsiscan.train import augment_patch, compose_epoch, train_round

from .conftest import REPO, run_snakemake

MPP = 0.5
W, H = 1280, 1024
TISSUE = (128, 128, 1152, 896)  # x0, y0, x1, y1: multiples of the mask's 16 px
PINK = (228, 150, 200)
PURPLE = (90, 50, 140)
TUMOUR_C, TUMOUR_R = (450.0, 450.0), 160.0  # tumour disc on tumour slides (level-0 px)
HOLE = (430.0, 430.0, 470.0, 470.0)  # `_2` exclusion square inside the tumour
MIMIC_C, MIMIC_R = (820.0, 520.0), 120.0  # planted tumour texture on the mimic slide
POS_MARGIN_UM, NEG_MARGIN_UM = 10.0, 30.0
SLIM = 1 / 16


# -- cohort ---------------------------------------------------------------------------------------
def disc(centre: tuple[float, float], radius: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def inside(poly: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return MplPath(poly).contains_points(np.asarray(xy, dtype=np.float64))


def edge_distance(poly: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Distance (px) of points to the polygon's boundary."""
    p = np.asarray(xy, dtype=np.float64)[:, None, :]
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(axis=1)


def paint(rng: np.random.Generator, shape: tuple[int, int], colour: tuple[int, int, int]):
    noise = rng.normal(0.0, 12.0, (*shape, 3))
    return np.clip(np.array(colour, np.float64) + noise, 0, 255)


def write_slide(path: Path, kind: str, seed: int) -> None:
    """A 3-level JPEG TIFF: white background, pink tissue rectangle, purple disc (tumour/mimic)."""
    rng = np.random.default_rng(seed)
    img = paint(rng, (H, W), (242, 240, 242))
    x0, y0, x1, y1 = TISSUE
    img[y0:y1, x0:x1] = paint(rng, (y1 - y0, x1 - x0), PINK)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    if kind in ("tumour", "mimic"):
        (cx, cy), r = (TUMOUR_C, TUMOUR_R) if kind == "tumour" else (MIMIC_C, MIMIC_R)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        if kind == "tumour":
            hx0, hy0, hx1, hy1 = HOLE
            blob &= ~((xx >= hx0) & (xx < hx1) & (yy >= hy0) & (yy < hy1))
        img[blob] = paint(rng, (int(blob.sum()),), PURPLE)
    img = img.astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate((1, 4, 16)):
            res = 1e4 / (MPP * f)
            tw.write(
                np.ascontiguousarray(img[::f, ::f]),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
            )


COHORT = {"t1": "tumour", "t2": "tumour", "n1": "mimic", "n2": "normal"}
SHEET_HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """The slides, their masks and ROI grids, and a sample sheet listing them (split train, with
    absolute paths) as rule train_patches reads it."""
    root = tmp_path_factory.mktemp("cohort")
    slides = {}
    rows = []
    for seed, (sid, kind) in enumerate(COHORT.items()):
        tif, png, rois = root / f"{sid}.tif", root / sid / "tissue.png", root / sid / "rois.h5"
        write_slide(tif, kind, seed)
        xml = None
        if kind == "tumour":
            xml = root / f"{sid}.xml"
            write_asap_xml(
                xml,
                [
                    Annotation("Annotation 0", "Tumor", disc(TUMOUR_C, TUMOUR_R)),
                    Annotation("Annotation 1", "_2", square(*HOLE)),
                ],
            )
        tissue_mask(tif, png, root / sid / "qc.png", TissueMaskParams(), slide_id=sid)
        roi_grid(tif, png, rois, RoiGridParams(n=8, alpha=2), slide_id=sid)
        label = "tumor" if kind == "tumour" else "normal"
        slides[sid] = {"tif": tif, "xml": xml, "mask": png, "rois": rois, "label": label}
        rows.append(f"{sid}\t{tif}\t{xml or ''}\t{label}\ttrain\n")
    sheet = root / "slides.tsv"
    sheet.write_text(SHEET_HEADER + "".join(rows))
    return {"root": root, "slides": slides, "sheet": sheet}


def mask_args(cohort: dict) -> list[str]:
    return [str(s["mask"]) for s in cohort["slides"].values()]


@pytest.fixture(scope="module")
def patches(cohort) -> Path:
    """patches.h5 written through the CLI (as the rule calls it)."""
    out = cohort["root"] / "train" / "patches.h5"
    rc = cli.main(
        [
            "train_patches",
            "--sheet",
            str(cohort["sheet"]),
            "--masks",
            *mask_args(cohort),
            "--out-patches",
            str(out),
            "--n-patches",
            "400",
            "--positive-fraction",
            "0.5",
            "--positive-margin-um",
            str(POS_MARGIN_UM),
            "--negative-margin-um",
            str(NEG_MARGIN_UM),
            "--raster-mpp",
            "2",
            "--val-fraction",
            "0.5",
            "--seed",
            "7",
        ]
    )
    assert rc == 0
    return out


# -- patches --------------------------------------------------------------------------------------
def test_patches_fall_where_their_labels_say(cohort, patches):
    table = read_patch_table(patches)
    assert table.attrs["Lf"] == 244 and table.attrs["seed"] == 7
    assert table.attrs["kind"] == "patches" and table.attrs["format"] == "wsiscan-patches/1"
    assert len(table) == 400 and int(table.label.sum()) == 200
    assert table.level0_xy.dtype == np.int64 and table.slide_index.dtype == np.int32
    assert table.slide_id == list(COHORT)  # the sheet's training slides, in sheet order
    np.testing.assert_allclose(table.slide_mpp, np.full(len(COHORT), MPP), rtol=1e-6)
    tumour, hole = disc(TUMOUR_C, TUMOUR_R), square(*HOLE)
    margin_px = {"pos": POS_MARGIN_UM / MPP, "neg": NEG_MARGIN_UM / MPP}
    for i, sid in enumerate(table.slide_id):
        s = cohort["slides"][sid]
        sel = table.slide_index == i
        xy, lab = table.level0_xy[sel], table.label[sel]
        pos, neg = xy[lab == 1], xy[lab == 0]
        assert len(neg) == 50, sid  # equal share of the 200 negatives over 4 slides
        if s["label"] == "tumor":
            assert len(pos) == 100  # equal share of the 200 positives over 2 tumour slides
            assert inside(tumour, pos).all() and not inside(hole, pos).any()
            assert edge_distance(tumour, pos).min() >= margin_px["pos"]
            assert edge_distance(hole, pos).min() >= margin_px["pos"]
            assert not inside(tumour, neg).any()
            assert edge_distance(tumour, neg).min() >= margin_px["neg"]
        else:
            assert len(pos) == 0
        # negatives lie in tissue: the painted rectangle (the mask is exact there) ...
        x0, y0, x1, y1 = TISSUE
        assert ((neg[:, 0] >= x0) & (neg[:, 0] < x1) & (neg[:, 1] >= y0) & (neg[:, 1] < y1)).all()
        # ... and in the tissue mask the workflow made
        mask, meta = read_tissue_mask(s["mask"])
        cols = (neg[:, 0] / meta["downsample_x"]).astype(int)
        rows = (neg[:, 1] / meta["downsample_y"]).astype(int)
        assert mask[rows, cols].all()
    # the mimic slide's negatives spread over its tissue, mimic included (it is not annotated)
    n1 = table.level0_xy[(table.slide_index == table.slide_id.index("n1")) & (table.label == 0)]
    assert len({(x // 256, y // 256) for x, y in n1}) >= 8


def test_patches_are_deterministic_and_split_by_slide(cohort, patches, tmp_path):
    slides = [
        TrainSlide(sid, str(s["tif"]), s["label"], str(s["mask"]), s["xml"] and str(s["xml"]))
        for sid, s in cohort["slides"].items()
    ]
    # the stage finds each training slide's mask by the mask's slide_id, in any order
    assert training_slides(cohort["sheet"], mask_args(cohort)[::-1]) == slides
    params = TrainPatchesParams(
        n_patches=400,
        positive_margin_um=POS_MARGIN_UM,
        negative_margin_um=NEG_MARGIN_UM,
        raster_mpp=2.0,
        val_fraction=0.5,
        seed=7,
    )
    a, _ = draw_patches(slides, params)
    b = read_patch_table(patches)
    np.testing.assert_array_equal(a.level0_xy, b.level0_xy)
    np.testing.assert_array_equal(a.label, b.label)
    # one tumour and one normal slide held out
    val = [s for s, v in zip(a.slide_id, a.slide_is_val, strict=True) if v]
    assert sorted(cohort["slides"][s]["label"] for s in val) == ["normal", "tumor"]
    train_patches(cohort["sheet"], mask_args(cohort), tmp_path / "c.h5", params.replace(seed=8))
    c = read_patch_table(tmp_path / "c.h5")
    assert not np.array_equal(a.level0_xy, c.level0_xy)
    assert c.attrs["seed"] == 8


def test_patches_and_mining_read_the_group_settings(cohort, patches, tmp_path):
    """train_patches and mine_negatives read annotations through annotation.tumour_groups and
    annotation.exclusion_groups: a Camelyon17-style XML (group metastases, exclusion cut) is an
    error under the defaults and, with the groups set, the same raster as the Camelyon16 XML; a
    QuPath GeoJSON of the same polygons too."""
    import dataclasses

    from wsiscan.errors import SlideError
    from wsiscan.formats.rois import read_rois
    from wsiscan.mining import slide_tumour_distance
    from wsiscan.params import MineNegativesParams
    from wsiscan.patches import slide_raster

    s = cohort["slides"]["t1"]
    polys = [disc(TUMOUR_C, TUMOUR_R), square(*HOLE)]
    c17 = tmp_path / "t1_c17.xml"
    write_asap_xml(
        c17, [Annotation("A0", "metastases", polys[0]), Annotation("A1", "cut", polys[1])]
    )
    ring = [p.tolist() + [p[0].tolist()] for p in polys]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [r]},
            "properties": {"classification": {"name": g}},
        }
        for r, g in zip(ring, ["Tumor", "_2"], strict=True)
    ]
    qupath = tmp_path / "t1.geojson"
    qupath.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    c17_groups = {"tumour_groups": ["metastases"], "exclusion_groups": ["cut"]}

    def raster(annotation, **groups):
        slide = TrainSlide("t1", str(s["tif"]), "tumor", str(s["mask"]), str(annotation))
        return slide_raster(slide, TrainPatchesParams(raster_mpp=2, **groups))

    want = raster(s["xml"])
    assert want.pos.sum() > 0
    with pytest.raises(
        SlideError, match=r"slide 't1'.*t1_c17.xml.*groups found: \['cut', 'metastases'\]"
    ):
        raster(c17)
    for got in (raster(c17, **c17_groups), raster(qupath)):
        assert np.array_equal(got.pos, want.pos) and np.array_equal(got.neg, want.neg)

    table = read_patch_table(patches)
    i = table.slide_id.index("t1")
    grid = read_rois(s["rois"])
    mine = MineNegativesParams(raster_mpp=2)
    want = slide_tumour_distance(table, i, grid, mine).outside
    renamed = dataclasses.replace(
        table,
        slide_annotation=[str(c17) if k == i else a for k, a in enumerate(table.slide_annotation)],
    )
    with pytest.raises(SlideError, match="no polygon is in a tumour group"):
        slide_tumour_distance(renamed, i, grid, mine)
    got = slide_tumour_distance(renamed, i, grid, mine.replace(**c17_groups)).outside
    np.testing.assert_array_equal(got, want)


def test_patch_helpers():
    assert water_fill(10, [100, 1, 100]).tolist() == [4, 1, 5]
    assert water_fill(50, [3, 4, 5]).tolist() == [3, 4, 5]
    assert water_fill(0, [3, 4]).tolist() == [0, 0]
    is_val = split_validation_slides(
        [f"s{i}" for i in range(10)], ["tumor"] * 6 + ["normal"] * 4, 0.2, seed=0
    )
    assert is_val[:6].sum() == 1 and is_val[6:].sum() == 1
    assert not split_validation_slides(["a", "b"], ["tumor", "normal"], 0.5, 0).any()
    rng = np.random.default_rng(0)
    keys = compose_epoch(np.arange(10), np.arange(10, 100), np.arange(100, 105), 40, 0.5, 0.25, rng)
    assert len(keys) == 40
    assert (keys < 10).sum() == 20 and (keys >= 100).sum() == 5  # hard negatives: all 5 there are
    assert len(set(keys[keys < 10])) == 10  # every positive before any repeats


def test_augmentation_keeps_geometry_and_is_modest():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (244, 244, 3), dtype=np.uint8)
    off = TrainRoundParams(hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0, hue=0)
    seen = set()
    for seed in range(16):
        out = augment_patch(rgb, np.random.default_rng(seed), off)
        assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        assert sorted(out.ravel().tolist()) == sorted(rgb.ravel().tolist())  # same pixels moved
        seen.add(out.tobytes())
    assert len(seen) >= 5  # flips x rotations
    for colour in (
        TrainRoundParams(flips=False, rotate90=False),  # HED (the default)
        TrainRoundParams(flips=False, rotate90=False, hed_scale=0, hed_shift=0, brightness=0.1,
                         contrast=0.1, saturation=0.1, hue=0.02),  # colour jitter alone
    ):  # fmt: skip
        out = augment_patch(rgb, np.random.default_rng(1), colour).astype(float)
        assert 0 < np.abs(out - rgb).mean() < 30


# -- trainer --------------------------------------------------------------------------------------
def tiny_params(**kw) -> TrainRoundParams:
    base = dict(
        width=SLIM,
        epochs=2,
        patches_per_epoch=4,
        batch_size=2,
        val_patches=2,
        workers=0,
        warmup_steps=1,
        threads=2,
        device="cpu",
        seed=3,
    )
    base.update(kw)
    return TrainRoundParams(**base)


class CrashError(RuntimeError):
    pass


def test_training_resumes_from_its_checkpoint(patches, tmp_path):
    def paths(name: str) -> dict:
        d = tmp_path / name
        return {
            "out_model": d / "model.pt",
            "out_metrics": d / "metrics.json",
            "out_loss_png": d / "loss.png",
        }

    full = train_round(patches, params=tiny_params(), round_index=1, **paths("full"))
    assert [e["epoch"] for e in full["epochs"]] == [1, 2] and full["resumed_from_epoch"] is None
    assert all(e["val_loss"] is not None for e in full["epochs"])  # validation slides exist

    calls: list[int] = []

    def crash_after_one(epoch: int, record: dict) -> None:
        calls.append(epoch)
        if epoch == 1:
            raise CrashError("killed after epoch 1")

    p = paths("crash")
    with pytest.raises(CrashError):
        train_round(patches, params=tiny_params(), round_index=1, on_epoch_end=crash_after_one, **p)
    ckpt = p["out_model"].with_name("checkpoint.pt")
    assert ckpt.is_file() and not p["out_model"].exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    stale = tmp_path / "stale.pt"
    stale.write_bytes(ckpt.read_bytes())

    calls.clear()
    resumed = train_round(
        patches, params=tiny_params(), round_index=1, on_epoch_end=crash_after_one, **p
    )
    assert calls == [2], "the resumed run must train only the missing epoch"
    assert resumed["resumed_from_epoch"] == 1
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][:1] == state["history"]
    assert not ckpt.exists()  # removed once model.pt is written
    # continuing gives exactly the uninterrupted run's weights (seeded per sample and epoch)
    a, cfg = load_checkpoint(p["out_model"])
    b, _ = load_checkpoint(paths("full")["out_model"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    assert cfg["meta"]["round"] == 1 and cfg["meta"]["trained"] is True
    metrics = json.loads(p["out_metrics"].read_text())
    assert metrics["epochs"][-1]["samples_per_s"] > 0 and p["out_loss_png"].stat().st_size > 0

    # a checkpoint of another set-up (here another learning rate) is not resumed
    ckpt.write_bytes(stale.read_bytes())
    calls.clear()
    fresh = train_round(
        patches,
        params=tiny_params(lr=5e-4, epochs=1),
        round_index=1,
        on_epoch_end=lambda e, r: calls.append(e),
        **p,
    )
    assert calls == [1] and fresh["resumed_from_epoch"] is None


def test_loader_workers_give_the_same_training(patches, tmp_path):
    """Producer processes change the speed, not the result (augmentation seeded per sample)."""
    out = {}
    for workers in (0, 2):
        d = tmp_path / f"w{workers}"
        out[workers] = train_round(
            patches,
            d / "model.pt",
            d / "metrics.json",
            d / "loss.png",
            tiny_params(epochs=1, workers=workers),
            round_index=1,
        )
    assert out[0]["epochs"][0]["loss"] == pytest.approx(out[2]["epochs"][0]["loss"], abs=1e-6)
    assert out[2]["workers"] == 2


def test_identical_training_writes_identical_files(cohort, patches, tmp_path):
    """model.pt holds no run timings and hard_negatives.h5 no timestamps: the same round trained
    (and mined) twice gives files with the same SHA-256, so model_checksum is reproducible."""
    from wsiscan.fileio import sha256_file

    digests = []
    for name in ("a", "b"):
        d = tmp_path / name
        train_round(
            patches, d / "model.pt", d / "metrics.json", d / "loss.png",
            tiny_params(epochs=1), round_index=1,
        )  # fmt: skip
        rois = [str(s["rois"]) for s in cohort["slides"].values()]
        args = ["mine_negatives", "--round-index", "1", "--patches", str(patches), "--model"]
        args += [str(d / "model.pt"), "--rois", *rois]
        args += ["--out-hard-negatives", str(d / "hard_negatives.h5"), "--threshold", "0.4"]
        args += ["--workers", "0", "--device", "cpu", "--block-fraction", "0.2"]
        assert cli.main(args) == 0
        digests.append((sha256_file(d / "model.pt"), sha256_file(d / "hard_negatives.h5")))
    assert digests[0] == digests[1]
    meta = load_checkpoint(tmp_path / "a" / "model.pt")[1]["meta"]
    assert not {"samples_per_s", "train_s", "epoch_time_s", "data_wait_s"} & set(meta["final"])
    assert "workers" not in meta["train_params"] and "device" not in meta["train_params"]


# -- mining ---------------------------------------------------------------------------------------
def purple_detector(path: Path) -> ScanNet:
    """A slim ScanNet whose weights respond to the dark-purple texture: conv1 computes
    relu(0.5 - red), every later layer averages channel 0, fc8 thresholds it."""
    model = ScanNet(width=SLIM)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
            k = conv.kernel_size[0] * conv.kernel_size[1]
            if conv is convs[0]:
                conv.weight[0, 0] = -1.0 / k  # red (normalised) lowers the feature
                conv.bias[0] = 0.5
            elif conv is convs[-1]:
                conv.weight[1, 0] = 20.0
                conv.bias[1] = -10.0  # tumour probability > 0.5 where channel 0 > 0.5
            else:
                conv.weight[0, 0] = 1.0 / k
    model.eval()
    save_checkpoint(path, model, {"test": "purple detector"})
    return model


def test_mining_finds_the_planted_mimic(cohort, patches, tmp_path):
    model = purple_detector(tmp_path / "model.pt")
    out = tmp_path / "hard_negatives.h5"
    rois = [str(s["rois"]) for s in cohort["slides"].values()]
    args = ["mine_negatives", "--round-index", "1", "--patches", str(patches), "--model"]
    args += [str(tmp_path / "model.pt"), "--rois", *rois, "--out-hard-negatives", str(out)]
    args += ["--threshold", "0.5"]
    args += ["--margin-um", "75", "--max-per-slide", "40", "--max-per-round", "1000"]
    args += ["--workers", "0", "--device", "cpu", "--raster-mpp", "2"]
    assert cli.main(args) == 0
    hard = read_patch_table(out)
    summary = json.loads(hard.attrs["summary_json"])
    by_slide = {r["slide_id"]: r for r in summary["slides"]}
    # the planted mimic fires; the annotated tumour (same texture) is excluded by the margin
    assert by_slide["n1"]["false_positive_cells"] > 40 and by_slide["n1"]["hard_negatives"] == 40
    for sid in ("t1", "t2", "n2"):
        assert by_slide[sid]["false_positive_cells"] == 0, sid
    assert len(hard) == 40 and (hard.label == 0).all()
    assert hard.slide_id == read_patch_table(patches).slide_id  # same slide table
    xy = hard.level0_xy
    # every hard negative's patch reaches into the mimic (receptive field half-side 122 px)
    d = np.hypot(xy[:, 0] - MIMIC_C[0], xy[:, 1] - MIMIC_C[1])
    assert (d < MIMIC_R + 122).all() and (d < MIMIC_R).mean() > 0.5
    # the stored centre is the centre of the patch the dense map scored: re-classify it directly
    with open_slide(cohort["slides"]["n1"]["tif"]) as slide:
        crops = np.stack([slide.read_rgb((x - 122, y - 122), 0, (244, 244)) for x, y in xy])
    with torch.inference_mode():
        prob = torch.softmax(model(to_tensor(crops)), 1)[:, 1, 0, 0].numpy()
    np.testing.assert_allclose(prob, hard.probability, atol=1e-4)
    assert (prob > 0.5).all()

    # round 2 fine-tunes from the round-1 model on the base patches plus these hard negatives
    d = tmp_path / "round2"
    metrics = train_round(
        patches,
        d / "model.pt",
        d / "metrics.json",
        d / "loss.png",
        tiny_params(epochs=1, hard_negative_fraction=0.5),
        round_index=2,
        hard_negatives=[out],
        init_model=tmp_path / "model.pt",
    )
    n1_is_val = bool(hard.slide_is_val[hard.slide_id.index("n1")])
    assert metrics["n_train_hard_negative"] == (0 if n1_is_val else 40)
    assert metrics["init"].startswith("finetune:") and metrics["round"] == 2
    assert (metrics["epochs"][0]["val_acc_hard"] is not None) == n1_is_val


def test_mining_block_subset(cohort, tmp_path):
    from wsiscan.formats.rois import read_rois, write_rois
    from wsiscan.mining import block_subset

    full = read_rois(cohort["slides"]["n1"]["rois"])
    assert block_subset(full, 1.0, np.random.default_rng(0)) is full
    sub = block_subset(full, 0.5, np.random.default_rng(0))
    # the subset is a valid ROI grid of the same slide: it passes the reader's checks
    write_rois(tmp_path / "half.h5", sub)
    part = read_rois(tmp_path / "half.h5", "n1")
    n = full.n_blocks
    assert part.n_blocks == round(n / 2)
    assert {tuple(g) for g in part.grid_xy} <= {tuple(g) for g in full.grid_xy}
    assert part.attrs()["geometry_checksum"] == full.attrs()["geometry_checksum"]


# -- DAG ------------------------------------------------------------------------------------------
SHEET = """slide_id\tpath\tannotation\tlabel\tsplit
tr_t1\tdata/demo/tr_t1.tif\tdata/demo/tr_t1.xml\ttumor\ttrain
tr_t2\tdata/demo/tr_t2.tif\tdata/demo/tr_t2.xml\ttumor\ttrain
tr_n1\tdata/demo/tr_n1.tif\t\tnormal\ttrain
te_t1\tdata/demo/te_t1.tif\tdata/demo/te_t1.xml\ttumor\ttest
te_n1\tdata/demo/te_n1.tif\t\tnormal\ttest
"""


def dry_run(workdir: Path, rounds: int) -> str:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["samples"] = "config/slides.tsv"
    cfg["train"]["rounds"] = rounds
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (workdir / "config" / "slides.tsv").write_text(SHEET)
    return run_snakemake(workdir, "-n", "-p", "--cores", "2").stdout


def jobs(dry: str) -> dict[tuple[str, int], dict[str, str]]:
    """``(rule, round) -> {"input", "shell"}`` of the training jobs in a dry-run printout."""
    out = {}
    for block in re.split(r"\n(?=\[.*?\]\nrule |rule )", dry):
        m = re.search(r"^rule (train_round|mine_negatives):", block, re.M)
        if not m:
            continue
        k = int(re.search(r"wildcards: round=(\d+)", block).group(1))
        out[(m.group(1), k)] = {
            "input": re.search(r"input: (.*)", block).group(1),
            "shell": re.search(r"wsiscan \S+.*", block).group(0),
        }
    return out


def test_round_dag(tmp_path):
    dry3 = dry_run(tmp_path / "r3", 3)
    three = jobs(dry3)
    assert sorted(three) == [
        ("mine_negatives", 1),
        ("mine_negatives", 2),
        ("train_round", 1),
        ("train_round", 2),
        ("train_round", 3),
    ]
    deps = defaultdict(set)
    for (rule, k), job in three.items():
        deps[(rule, k)] = set(job["input"].split(", "))
    assert deps[("train_round", 1)] == {"results/train/patches.h5"}
    for k in (2, 3):
        expected = {"results/train/patches.h5", f"results/train/round{k - 1}/model.pt"}
        expected |= {f"results/train/round{j}/hard_negatives.h5" for j in range(1, k)}
        assert deps[("train_round", k)] == expected
    for k in (1, 2):
        assert f"results/train/round{k}/model.pt" in deps[("mine_negatives", k)]
        assert "results/tr_n1/rois.h5" in deps[("mine_negatives", k)]
        assert "results/te_n1/rois.h5" not in deps[("mine_negatives", k)]
    # inference uses the last round's model
    infer_inputs = re.findall(r"rule infer:\n(?:.*\n)*?\s+input: (.*)", dry3)
    assert infer_inputs and all("results/train/round3/model.pt" in i for i in infer_inputs)
    # raising rounds 2 -> 3 leaves the earlier rounds' jobs exactly as they were (inputs and
    # command lines, hence params): only mine_negatives 2 and train_round 3 are new
    two = jobs(dry_run(tmp_path / "r2", 2))
    assert sorted(two) == [("mine_negatives", 1), ("train_round", 1), ("train_round", 2)]
    for key, job in two.items():
        assert three[key] == job, key
    # there is no round 0 (rounds = 0 means an untrained model, rule init_model)
    proc = run_snakemake(tmp_path / "r2", "-n", "results/train/round0/model.pt", check=False)
    assert proc.returncode != 0 and "numbered from 1" in proc.stdout + proc.stderr
    # training rounds without training slides stop the run before any job, saying why
    sheet = tmp_path / "r2" / "config" / "slides.tsv"
    sheet.write_text("\n".join(line for line in SHEET.splitlines() if "\ttrain" not in line))
    proc = run_snakemake(tmp_path / "r2", "-n", check=False)
    assert proc.returncode != 0 and "no training slides" in proc.stdout + proc.stderr


def test_geometry_helpers_agree_with_the_grid():
    # the patch centre convention: a cell centre minus Lf // 2 is the block's patch offset
    from wsiscan.geometry import Geometry

    for alpha in (1, 2, 4):
        g = Geometry.for_arch("vgg16", n=2, alpha=alpha)
        j = 7
        centre = j * g.Sd + g.Sd // 2
        bx, c = divmod(j, g.tile_side)
        assert centre - g.Lf // 2 == g.origin + bx * g.Sr + c * g.Sd
        assert math.isclose((centre - g.Lf // 2 - g.origin) % g.Sd, 0)


# -- the training stages through Snakemake (slow) --------------------------------------------------
def job_counts(output: str) -> dict[str, int]:
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert match, output
    return {r: int(n) for r, n in re.findall(r"^(\S+)\s+(\d+)\s*$", match.group(1), re.M)}


@pytest.mark.slow
def test_rounds_run_and_raising_rounds_reruns_only_new_stages(trained_cohort: Path):
    """Two rounds through Snakemake (the shared trained cohort): round 2 fine-tunes round 1 with
    round 1's hard negatives; raising train.rounds to 3 plans only round 2's mining and round 3."""
    root = trained_cohort
    counts = job_counts((root / "first_run.log").read_text())
    assert counts["train_round"] == 2 and counts["mine_negatives"] == 1, counts
    round2 = json.loads((root / "results/train/round2/metrics.json").read_text())
    hard = read_patch_table(root / "results/train/round1/hard_negatives.h5")
    assert round2["init"].startswith("finetune:") and hard.attrs["round"] == 1
    assert round2["n_train_hard_negative"] == len(hard)
    logs = ("train_patches/patches.log", "train_round/round1.log", "mine_negatives/round1.log")
    for rel in logs:
        assert (root / "results" / "logs" / rel).stat().st_size > 0
    assert not (root / "results/train/round1/checkpoint.pt").exists()

    # rounds 2 -> 3: only round 2's mining and round 3 are new; earlier rounds stay up to date
    path = root / "config" / "config.yaml"
    original = path.read_text()
    try:
        cfg = yaml.safe_load(original)
        cfg["train"]["rounds"] = 3
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        dry = run_snakemake(root, "--cores", "2", "-n", "results/train/round3/model.pt")
        assert job_counts(dry.stdout + dry.stderr) == {"mine_negatives": 1, "train_round": 1}
        assert "round=2" in dry.stdout and "results/train/round2/hard_negatives.h5" in dry.stdout
    finally:
        path.write_text(original)
    dry = run_snakemake(root, "--cores", "2", "-n", "results/train/round2/model.pt")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_a_damaged_slide_in_a_loader_process_is_one_line(cohort, patches, tmp_path, capsys):
    """train.workers: 2 with training slides whose level-0 tiles cannot be decoded: the error
    raised inside a DataLoader worker reaches the user as one line naming the slide and the
    region, and the failure record holds that line, not torch's traceback."""
    from wsiscan.formats.patches import write_patch_table

    from .test_bad_input import damage_tile

    table = read_patch_table(patches)
    damaged = []
    for sid, path in zip(table.slide_id, table.slide_path, strict=True):
        copy = tmp_path / f"{sid}.tif"
        copy.write_bytes(Path(path).read_bytes())
        for tile in np.ndindex(H // 256, W // 256):
            damage_tile(copy, tile[::-1])
        damaged.append(str(copy))
    table.slide_path = damaged
    bad = tmp_path / "patches.h5"
    write_patch_table(bad, table, table.attrs)
    record = tmp_path / "FAILED.json"
    out = tmp_path / "round1"
    argv = [
        "--failure-record", record, "train_round", "--round-index", "1", "--patches", bad,
        "--out-model", out / "model.pt", "--out-metrics", out / "metrics.json",
        "--out-loss-png", out / "loss.png", "--width", str(SLIM), "--epochs", "1",
        "--patches-per-epoch", "4", "--batch-size", "2", "--val-patches", "2", "--workers", "2",
        "--threads", "1", "--device", "cpu", "--warmup-steps", "1",
    ]  # fmt: skip
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("wsiscan train_round: error:")]
    assert len(lines) == 1, err
    assert re.search(
        r"slide '(t1|t2|n1|n2)' \(.*\.tif\): cannot read the 244x244 px region", lines[0]
    )
    cause = json.loads(record.read_text())["cause"]
    assert "\n" not in cause and "DataLoader" not in cause and "cannot read" in cause
    assert not (out / "model.pt").exists()


def test_the_stain_reference_travels_with_the_model(cohort, patches, tmp_path):
    """stain.normalisation macenko: train_round fits the training slides' reference stain and
    keeps it in model.pt (plain types: loads with weights_only); infer normalises to it."""
    import h5py

    from wsiscan.formats.checkpoint import read_checkpoint_config, stain_reference
    from wsiscan.infer import infer
    from wsiscan.params import InferParams

    model = tmp_path / "model.pt"
    params = tiny_params(epochs=1, normalisation="macenko", hed_scale=0.0, hed_shift=0.0)
    train_round(patches, model, tmp_path / "m.json", tmp_path / "loss.png", params, round_index=1)
    torch.load(model, weights_only=True)
    meta = read_checkpoint_config(model)["meta"]
    assert meta["stain"]["normalisation"] == "macenko"
    assert sorted(meta["stain"]["slides"]) == sorted(COHORT)
    reference = stain_reference(read_checkpoint_config(model), model)
    assert reference.he_od.shape == (3, 2) and (reference.max_conc > 0).all()
    s = cohort["slides"]["t1"]
    infer_params = InferParams(device="cpu", workers=0, batch_size=4)
    infer(s["tif"], s["rois"], model, tmp_path / "tiles.h5", infer_params, slide_id="t1")
    with h5py.File(tmp_path / "tiles.h5") as f:
        assert f.attrs["stain_normalisation"] == "macenko"
        assert "reference" in json.loads(f.attrs["stain_fit_json"])
