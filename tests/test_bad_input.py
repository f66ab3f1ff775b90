"""Bad input (issue 9): every case fails its stage with one line naming the slide, the file and the
cause (exit 1, no traceback), or, where the input is valid but unusual, completes.

Most tests call ``wsiscan.cli.main`` in-process (the same code path as the ``wsiscan`` command,
stderr captured); one runs the installed command in a subprocess. Slides are real OpenSlide-read
pyramidal TIFFs written here; a small complete per-slide result (mask, grid, model, tiles, map,
lesions) is built once per module through the stage functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml

from wsiscan.cli import main
from wsiscan.config import validate_config
from wsiscan.errors import ConfigError

from .conftest import BIN, REPO, run_snakemake

MPP = 0.5
N = 4  # ROI side Lr = 244 + 4*32 = 372 px; alpha 2: block 388 px, output stride 16 px
ALPHA = 2
WIDTH = 0.125
HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"


# -- slides ----------------------------------------------------------------------------------------
def he_image(h: int, w: int, seed: int = 0, tissue: bool = True) -> np.ndarray:
    """H&E-like RGB uint8: white glass with a textured pink tissue ellipse and dark nuclei."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 244, np.int16) + rng.integers(-3, 4, (h, w, 1), dtype=np.int16)
    if tissue:
        yy, xx = np.mgrid[0:h, 0:w]
        inside = ((yy - h / 2) / (0.38 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
        pink = np.array([222, 140, 190], np.int16) + rng.integers(-25, 26, (h, w, 3))
        nuclei = rng.random((h, w)) < 0.02
        pink[nuclei] = (90, 40, 130)
        img[inside] = pink[inside]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(
    path: Path, rgb: np.ndarray, mpp: float | None = MPP, factors: tuple[int, ...] = (1, 4)
) -> Path:
    """OpenSlide-readable pyramidal TIFF: one tiled (256 px) JPEG page per level; resolution
    tags in pixels per cm when ``mpp`` is given (OpenSlide then reports it), none otherwise."""
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate(factors):
            level = np.ascontiguousarray(rgb[::f, ::f])
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * f)
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if k else 0,
                **extra,
            )
    return path


def damage_tile(path: Path, tile_xy: tuple[int, int]) -> None:
    """Zero the first bytes (the JPEG header) of level-0 tile ``(col, row)``: it cannot decode."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        k = tile_xy[1] * per_row + tile_xy[0]
        offset = page.dataoffsets[k]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(32))


# -- running stages --------------------------------------------------------------------------------
def run_cli(capsys, *argv: str | Path) -> tuple[int, str]:
    """``wsiscan argv...`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, stage: str, *words: str) -> str:
    """Exit 1 and exactly one ``wsiscan <stage>: error:`` line holding ``words``; no traceback."""
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"wsiscan {stage}: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@dataclass
class Result:
    """Files of one slide run through the per-slide stages."""

    root: Path
    slide: Path
    sid: str

    def __getattr__(self, name: str) -> Path:
        names = {
            "mask": "tissue.png",
            "qc": "qc/tissue.png",
            "rois": "rois.h5",
            "tiles": "tiles.h5",
            "probmap": "probmap.h5",
            "heatmap": "qc/heatmap.png",
            "lesions": "lesions.csv",
            "score": "score.json",
            "geojson": "lesions.geojson",
            "xml": "lesions.xml",
        }
        if name not in names:
            raise AttributeError(name)
        return self.root / "results" / self.sid / names[name]


def stage_args(r: Result, stage: str, model: Path) -> list[str | Path]:
    """The arguments of one per-slide stage, as the workflow rules pass them (file options named
    after the rule's inputs and outputs). stitch gets the opening and closing radii the stage
    used by default before they came from the config (8 and 16 um)."""
    common: list[str | Path] = ["--slide-id", r.sid]
    return {
        "tissue_mask": [
            "tissue_mask", "--slide", r.slide, *common, "--out-mask", r.mask, "--out-qc", r.qc,
        ],
        "roi_grid": [
            "roi_grid", "--slide", r.slide, *common, "--mask", r.mask, "--out-rois", r.rois,
            "--n", str(N), "--alpha", str(ALPHA),
        ],
        "infer": [
            "infer", "--slide", r.slide, *common, "--rois", r.rois, "--model", model,
            "--out-tiles", r.tiles, "--workers", "0", "--device", "cpu",
        ],
        "stitch": [
            "stitch", "--slide", r.slide, *common, "--tiles", r.tiles, "--mask", r.mask,
            "--out-probmap", r.probmap, "--out-qc", r.heatmap,
            "--opening-radius-um", "8", "--closing-radius-um", "16",
        ],
        "detect": [
            "detect", "--probmap", r.probmap, *common, "--out-lesions", r.lesions,
            "--out-score", r.score, "--out-geojson", r.geojson, "--out-xml", r.xml,
        ],
    }[stage]  # fmt: skip


STAGES = ("tissue_mask", "roi_grid", "infer", "stitch", "detect")


def temp_files(folder: Path) -> list[Path]:
    """Temporary files (and folders) of the atomic writers in ``folder``: hidden
    ``.<name>.<host>.<pid>.<hex>.tmp``, and any other ``*.tmp``."""
    return sorted(set(folder.glob(".*.tmp")) | set(folder.glob("*.tmp")))


def run_chain(capsys, r: Result, model: Path, stages=STAGES, extra=()) -> None:
    """Run ``stages`` of ``r`` in order; each must succeed."""
    for stage in stages:
        rc, err = run_cli(capsys, *extra, *stage_args(r, stage, model))
        assert rc == 0, f"{stage}: {err}"


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    from wsiscan.model import init_model
    from wsiscan.params import InitModelParams

    path = tmp_path_factory.mktemp("model") / "init.pt"
    init_model(path, InitModelParams(width=WIDTH, seed=0))
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory, model_pt) -> Result:
    """A 1024x768 px slide with tissue, through every per-slide stage (module scope)."""
    root = tmp_path_factory.mktemp("done")
    slide = write_tiff(root / "s1.tif", he_image(768, 1024, seed=1))
    r = Result(root, slide, "s1")
    for stage in STAGES:
        assert main([str(a) for a in stage_args(r, stage, model_pt)]) == 0, stage
    return r


# -- slide files -----------------------------------------------------------------------------------
def test_missing_slide(capsys, tmp_path):
    r = Result(tmp_path, tmp_path / "gone.svs", "s1")
    rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
    assert_one_line_error(rc, err, "tissue_mask", "slide 's1'", "gone.svs", "file not found")
    assert not r.mask.exists()


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [
        ("text.svs", b"this is a text file, not a slide\n" * 40, "not a slide format"),
        ("random.tif", np.random.default_rng(0).bytes(50_000), "not a slide format"),
        ("empty.svs", b"", "empty"),
    ],
)
def test_not_a_slide(capsys, tmp_path, name, content, cause):
    (tmp_path / name).write_bytes(content)
    r = Result(tmp_path, tmp_path / name, "s1")
    rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
    assert_one_line_error(rc, err, "tissue_mask", "slide 's1'", name, cause)


def test_truncated_tiff(capsys, tmp_path):
    good = write_tiff(tmp_path / "good.tif", he_image(1024, 1280))
    data = good.read_bytes()
    for frac in (0.5, 0.98):
        cut = tmp_path / f"cut{int(frac * 100)}.tif"
        cut.write_bytes(data[: int(len(data) * frac)])
        r = Result(tmp_path, cut, "s1")
        rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
        line = assert_one_line_error(rc, err, "tissue_mask", "slide 's1'", cut.name)
        assert "truncated" in line, line


def test_damaged_tile_fails_infer_naming_the_region(capsys, tmp_path, model_pt):
    """OpenSlide reports a tile whose JPEG header is broken as an error (it is not read as white);
    the mask (level 1) is fine, and infer, which reads level 0, fails naming the region."""
    slide = write_tiff(tmp_path / "bad.tif", he_image(640, 768, seed=2))
    damage_tile(slide, (1, 1))  # level-0 pixels x, y in [256, 512)
    r = Result(tmp_path, slide, "bad")
    run_chain(capsys, r, model_pt, stages=("tissue_mask", "roi_grid"))
    record = tmp_path / "results" / "bad" / "FAILED.json"
    argv = stage_args(r, "infer", model_pt)
    rc, err = run_cli(capsys, "--failure-record", record, *argv)
    line = assert_one_line_error(rc, err, "infer", "slide 'bad'", "bad.tif", "level 0")
    x, y = (int(v) for v in re.search(r"level0_xy=\((-?\d+), (-?\d+)\)", line).groups())
    side = 244 + N * 32 + (ALPHA - 1) * 16
    assert x < 512 and x + side > 256 and y < 512 and y + side > 256, line  # holds the tile
    assert not r.tiles.exists() and not temp_files(r.tiles.parent)
    rec = json.loads(record.read_text())
    assert rec["stage"] == "infer" and rec["slide_id"] == "bad" and "level0_xy" in rec["cause"]
    # the tile is re-written: the same command succeeds and removes the record
    write_tiff(slide, he_image(640, 768, seed=2))
    rc, err = run_cli(capsys, "--failure-record", record, *argv)
    assert rc == 0, err
    assert r.tiles.is_file() and not record.exists()


def test_slide_without_mpp_needs_a_fallback(capsys, tmp_path):
    slide = write_tiff(tmp_path / "nompp.tif", he_image(512, 640), mpp=None)
    r = Result(tmp_path, slide, "nompp")
    rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
    assert_one_line_error(rc, err, "tissue_mask", "slide 'nompp'", "nompp.tif", "mpp_fallback")
    argv = [*stage_args(r, "tissue_mask", Path("unused")), "--mpp-fallback", "0.5"]
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    from wsiscan.formats.tissue_mask import read_tissue_mask

    assert read_tissue_mask(r.mask, "nompp")[1]["slide_mpp"] == 0.5


def test_slide_id_that_escapes_results_is_refused(capsys, tmp_path):
    slide = write_tiff(tmp_path / "s.tif", he_image(256, 256))
    rc, err = run_cli(
        capsys, "tissue_mask", "--slide", slide, "--slide-id", "../evil", "--out-mask",
        tmp_path / "m.png", "--out-qc", tmp_path / "q.png",
    )  # fmt: skip
    assert_one_line_error(rc, err, "tissue_mask", "'../evil'", "must match")
    assert not (tmp_path / "m.png").exists()


# -- valid but unusual slides: the stages complete ----------------------------------------------
def test_slide_without_tissue_completes_with_no_lesions(capsys, tmp_path, model_pt):
    slide = write_tiff(tmp_path / "blank.tif", he_image(1024, 1280, tissue=False))
    r = Result(tmp_path, slide, "blank")
    run_chain(capsys, r, model_pt)
    with h5py.File(r.rois) as f:
        assert f["level0_xy"].shape == (0, 2)
    with h5py.File(r.tiles) as f:
        assert f["tiles"].shape[0] == 0
    with h5py.File(r.probmap) as f:
        assert f["prob"].shape == (1024 // 16, 1280 // 16)
        assert float(f["prob"][()].max()) == 0.0
    assert pd.read_csv(r.lesions).empty
    score = json.loads(r.score.read_text())
    assert score["score"] == 0.0 and score["n_lesions"] == 0


def test_slide_smaller_than_one_roi(capsys, tmp_path, model_pt):
    """A 300x200 px slide is smaller than one 372 px ROI: its few blocks read white outside."""
    slide = write_tiff(tmp_path / "tiny.tif", he_image(200, 300, seed=3), factors=(1,))
    r = Result(tmp_path, slide, "tiny")
    run_chain(capsys, r, model_pt)
    with h5py.File(r.rois) as f:
        assert 1 <= f["level0_xy"].shape[0] <= 4  # output coverage 160 px: a 2x2 grid at most
    with h5py.File(r.probmap) as f:
        prob = f["prob"][()]
    assert prob.shape == (-(-200 // 16), -(-300 // 16))
    assert 0.0 < float(prob.max()) <= 1.0 and np.isfinite(prob).all()
    assert 0.0 <= json.loads(r.score.read_text())["score"] <= 1.0


# -- annotations (read by the cohort evaluation) ---------------------------------------------------
POLYGON = '<Coordinate Order="{o}" X="{x}" Y="{y}" />'


def asap(polygons: list[list[tuple[float, float]]], prolog: str = "") -> str:
    body = "".join(
        f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        + "".join(POLYGON.format(o=k, x=x, y=y) for k, (x, y) in enumerate(poly))
        + "</Coordinates></Annotation>"
        for i, poly in enumerate(polygons)
    )
    return f"{prolog}<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>"


SQUARE = [(300.0, 200.0), (950.0, 200.0), (950.0, 650.0), (300.0, 650.0)]
BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
)
EXTERNAL = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'


def evaluate(capsys, done: Result, annotation: str, tmp_path: Path, *extra: str):
    """``wsiscan evaluate`` of the finished slide as a tumour slide with ``annotation``."""
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + f"s1\t{done.slide}\t{annotation}\ttumor\ttest\n")
    out = tmp_path / "cohort"
    argv = ["evaluate", "--sheet", sheet, "--results-dir", done.root / "results", "--out-dir", out]
    rc, err = run_cli(capsys, *argv, "--bootstrap", "0", *extra)
    return rc, err, out


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        (None, "annotation file not found"),
        ("<ASAP_Annotations><Annotations><Annotation", "malformed annotation XML"),
        (BILLION_LAUGHS + asap([SQUARE]).replace('X="300.0"', 'X="&lol3;"', 1), "unsafe XML"),
        (EXTERNAL + asap([SQUARE]).replace('X="300.0"', 'X="&xxe;"', 1), "unsafe XML"),
        ("<Annotations/>", "not an ASAP annotation file"),
        (asap([SQUARE]).replace('Y="200.0"', 'Y="four"', 1), "bad <Coordinate>"),
    ],
    ids=["missing", "malformed", "entity-expansion", "external-entity", "not-asap", "bad-number"],
)
def test_bad_annotation_stops_the_evaluation(capsys, tmp_path, done, text, cause):
    xml = tmp_path / "s1.xml"
    if text is not None:
        xml.write_text(text)
    rc, err, out = evaluate(capsys, done, str(xml), tmp_path)
    line = assert_one_line_error(rc, err, "evaluate", "slide 's1'", "s1.xml", cause)
    assert "root:" not in line  # /etc/passwd was not read into anything
    assert not (out / "metrics.json").exists()


def test_short_and_outside_polygons_are_left_out_with_warnings(capsys, tmp_path, done, caplog):
    outside = [(1100.0, 800.0), (1500.0, 800.0), (1500.0, 1100.0)]  # within one slide size
    xml = tmp_path / "s1.xml"
    xml.write_text(asap([SQUARE, [(10.0, 10.0), (50.0, 10.0)], outside]))
    rc, err, out = evaluate(capsys, done, str(xml), tmp_path)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_lesions"] == 1  # the square; the 2-point and outside polygons count nothing
    assert any("outside the 1024x768 px slide" in w for w in metrics["warnings"])
    assert "fewer than 3" in caplog.text


def test_the_slide_itself_as_annotation_stops_the_evaluation(capsys, tmp_path, done):
    """A TIFF given as annotation must be a mask: the slide counted as 100 % tumour before."""
    rc, err, out = evaluate(capsys, done, str(done.slide), tmp_path)
    assert_one_line_error(rc, err, "evaluate", "slide 's1'", "s1.tif", "not a ground-truth mask")
    assert not (out / "metrics.json").exists()


def test_tumour_slide_without_annotation_is_a_sheet_error(tmp_path):
    from wsiscan.config import load_samples

    write_tiff(tmp_path / "t.tif", he_image(256, 256))
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + "t\tt.tif\tt.xml\ttumor\ttest\n")
    with pytest.raises(ConfigError, match=r"line 2 \(slide_id 't'\): annotation file 't.xml'"):
        load_samples(sheet, base_dir=tmp_path)


# -- config ----------------------------------------------------------------------------------------
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("demo", "width_px", -5, ["demo.width_px", "minimum"]),
        ("infer", "batch_size", 0, ["infer.batch_size", "minimum"]),
        ("infer", "batch_size", 2.5, ["infer.batch_size", "not of type 'integer'"]),
        ("stitch", "opening_radius_um", -1.0, ["stitch.opening_radius_um", "minimum"]),
        ("detect", "nms_radius_um", 0, ["detect.nms_radius_um"]),
        ("detect", "threshold", 1.5, ["detect.threshold", "maximum"]),
        ("scan", "alpha", 8, ["scan.alpha"]),
        ("scan", "alpha", "2", ["scan.alpha"]),
        ("scan", "n", True, ["scan.n", "not of type 'integer'"]),
        ("slide", "mpp_fallback", -0.25, ["slide.mpp_fallback"]),
        ("evaluate", "allow_missing", "yes", ["evaluate.allow_missing", "boolean"]),
        ("scan", "roi_px", 100, ["scan", "'roi_px' was unexpected"]),
        ("scan", "roi_side_px", 3000, ["scan.roi_side_px", "244 + n*32", "2996 or 3028"]),
        ("scan", "roi_side_px", 100, ["scan.roi_side_px", "not Lf + n*Sf"]),
    ],
)
def test_config_errors(section, key, value, words):
    cfg = default_config()
    cfg[section][key] = value
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    for word in words:
        assert word in str(exc.value)


def test_roi_side_px_sets_n_and_must_agree_with_it():
    cfg = default_config()
    del cfg["scan"]["n"]
    cfg["scan"]["roi_side_px"] = 2868
    assert validate_config(cfg)["scan"]["n"] == 82  # the paper's ROI
    cfg = default_config()
    del cfg["scan"]["n"]
    cfg["scan"]["roi_side_px"] = 244 + 30 * 32
    assert validate_config(cfg)["scan"]["n"] == 30
    cfg = default_config()
    cfg["scan"].update(n=20, roi_side_px=2868)
    with pytest.raises(ConfigError, match="scan.n 20 .* and scan.roi_side_px 2868 .* disagree"):
        validate_config(cfg)
    cfg["scan"]["roi_side_px"] = 244 + 20 * 32
    assert validate_config(cfg)["scan"]["n"] == 20


def test_workflow_takes_the_roi_side_from_the_config(workdir):
    cfg = default_config()
    del cfg["scan"]["n"]
    cfg["scan"]["roi_side_px"] = 244 + 9 * 32
    cfg["train"]["rounds"] = 0
    (workdir / "config" / "slides.tsv").write_text(
        HEADER + "d1\tdata/demo/d1.tif\t\tnormal\ttest\n"
    )
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(workdir, "-n", "-p", "--cores", "1")
    out = proc.stdout + proc.stderr
    assert re.search(r"wsiscan .*roi_grid .*--n 9 ", out), out[-3000:]
    cfg["scan"]["roi_side_px"] = 1000
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(workdir, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "invalid config: scan.roi_side_px: ROI side 1000" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("a b\tdata/demo/a.tif\t\tnormal\ttest", ["line 2", "slide_id"]),
        ("\tdata/demo/x.tif\t\tnormal\ttest", ["line 2", "slide_id"]),
        ("x\t\t\tnormal\ttest", ["line 2", "path"]),
        ("x\tdata/demo/x.tif\t\t\ttest", ["line 2", "label"]),
        ("x;rm\tdata/demo/x.tif\t\tnormal\ttest", ["line 2", "slide_id"]),
    ],
)
def test_sheet_rows(tmp_path, row, words):
    from wsiscan.config import load_samples

    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + row + "\n")
    with pytest.raises(ConfigError) as exc:
        load_samples(sheet, base_dir=tmp_path)
    for word in words:
        assert word in str(exc.value)


# -- checkpoints -----------------------------------------------------------------------------------
class _Mkdir:
    """A pickle payload that creates a folder when unpickled: it must never be."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_checkpoint_with_pickle_payload_is_refused(capsys, tmp_path, done, model_pt):
    marker = tmp_path / "payload-ran"
    raw = torch.load(model_pt, weights_only=True)
    raw["config"]["meta"] = _Mkdir(str(marker))
    evil = tmp_path / "evil.pt"
    torch.save(raw, evil)
    r = Result(tmp_path, done.slide, "s1")
    argv = stage_args(r, "infer", evil)
    argv[argv.index("--rois") + 1] = done.rois
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "infer", "evil.pt", "weights_only=True", "mkdir")
    assert not marker.exists() and not r.tiles.exists()


@pytest.mark.parametrize("case", ["width", "arch", "torchvision", "truncated"])
def test_checkpoint_mismatch(capsys, tmp_path, done, model_pt, case):
    raw = torch.load(model_pt, weights_only=True)
    words = {
        "width": ["width=0.25", "shape"],
        "arch": ["unknown architecture 'resnet50'"],
        "torchvision": ["not a wsiscan checkpoint"],
        "truncated": ["not a readable torch file"],
    }[case]
    bad = tmp_path / f"{case}.pt"
    if case == "width":
        raw["config"]["width"] = 0.25  # tensors of width 1/8 under a config of width 1/4
        torch.save(raw, bad)
    elif case == "arch":
        raw["config"]["arch"] = "resnet50"
        torch.save(raw, bad)
    elif case == "torchvision":
        torch.save(raw["state_dict"], bad)  # a bare state dict
    else:
        bad.write_bytes(model_pt.read_bytes()[:5000])
    r = Result(tmp_path, done.slide, "s1")
    argv = stage_args(r, "infer", bad)
    argv[argv.index("--rois") + 1] = done.rois
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "infer", f"{case}.pt", *words)
    assert not r.tiles.exists()


def test_installed_command_exits_1_with_one_line(tmp_path):
    """The ``wsiscan`` console script itself: exit status 1, one line, no traceback."""
    proc = subprocess.run(
        [str(BIN / "wsiscan"), "roi_grid", "--slide", str(tmp_path / "x.svs"), "--slide-id", "x",
         "--mask", str(tmp_path / "m.png"), "--out-rois", str(tmp_path / "r.h5"), "--n", "4",
         "--alpha", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("wsiscan roi_grid: error:")]
    assert len(lines) == 1 and "slide 'x'" in lines[0] and "m.png" in lines[0], proc.stderr


# -- issue 15: clear messages instead of tracebacks or silence ------------------------------------
def _sparse_and_damaged_centre(path: Path) -> tuple[int, int]:
    """A 1792x1536 px slide whose centre tile-sized region (the direct reader's self-check,
    level-0 x 768-1024, y 640-896) spans tiles (3, 2) and (3, 3): tile (3, 2) is left out of the
    file (byte count 0, a sparse TIFF: the direct reader steps aside and OpenSlide reads the
    region) and tile (3, 3) cannot be decoded, so OpenSlide meets the damage in the self-check.
    Returns the damaged tile's level-0 top-left corner."""
    write_tiff(path, he_image(1536, 1792, seed=2))
    damage_tile(path, (3, 3))
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tag = tf.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[2 * 7 + 3] = 0
        tag.overwrite(tuple(counts))
    return 3 * 256, 3 * 256


def test_openslide_error_in_the_self_check_does_not_stick(tmp_path):
    """OpenSlide keeps failing every read once it met an error; the slide is reopened, so a read
    far from the damage succeeds and the region that holds the damage is the one named."""
    from wsiscan.errors import SlideError
    from wsiscan.slide import open_slide

    path = tmp_path / "centre.tif"
    tx, ty = _sparse_and_damaged_centre(path)
    with open_slide(path, "c") as s:
        far = s.read_rgb((0, 0), 0, (388, 388))  # the first level-0 read runs the self-check
        assert not s.reads_tiles_directly and far.std() > 1
        with pytest.raises(SlideError) as info:
            s.read_rgb((tx - 100, ty - 100), 0, (388, 388))
        assert f"level0_xy=({tx - 100}, {ty - 100})" in str(info.value)
        # and after that error too: the handle is fresh again
        assert s.read_rgb((1400, 0), 0, (388, 388)).shape == (388, 388, 3)
    with open_slide(path, "c", direct_tiles=False) as ref:
        with pytest.raises(SlideError):
            ref.read_rgb((tx, ty), 0, (64, 64))
        assert np.array_equal(ref.read_rgb((0, 0), 0, (388, 388)), far)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_slide_path_that_is_no_file_says_what_it_is(capsys, tmp_path, kind):
    path = tmp_path / "s1.svs"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)  # opening it would block: it must never be opened
    r = Result(tmp_path, path, "s1")
    rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
    what = {"directory": "is a directory", "fifo": "is a named pipe (FIFO)"}[kind]
    line = assert_one_line_error(rc, err, "tissue_mask", "slide 's1'", "s1.svs", what)
    assert "not found" not in line


def test_an_implausible_resolution_names_the_fallback(capsys, tmp_path, caplog):
    """A 72 dpi TIFF says 352.8 um/px: tissue_mask fails naming slide.mpp_fallback; with the
    fallback the stage uses it, says so in its log and records it."""
    from wsiscan.formats.tissue_mask import read_tissue_mask

    slide = write_tiff(tmp_path / "dpi72.tif", he_image(512, 640), mpp=25400 / 72)
    r = Result(tmp_path, slide, "dpi72")
    rc, err = run_cli(capsys, *stage_args(r, "tissue_mask", Path("unused")))
    assert_one_line_error(
        rc, err, "tissue_mask", "slide 'dpi72'", "352.778 um/px", "plausible", "slide.mpp_fallback"
    )
    assert not r.mask.exists()
    with caplog.at_level("INFO"):
        rc, err = run_cli(
            capsys, *stage_args(r, "tissue_mask", Path("unused")), "--mpp-fallback", "0.5"
        )
    assert rc == 0, err
    assert "352.778 um/px" in caplog.text and "using slide.mpp_fallback 0.5" in caplog.text
    assert read_tissue_mask(r.mask, "dpi72")[1]["slide_mpp"] == 0.5


@pytest.mark.slow
def test_workflow_gives_the_fallback_only_to_the_implausible_slide(workdir):
    """Through Snakemake, with slide.mpp_fallback set: the 72 dpi slide's tissue_mask uses the
    fallback and says so in its log; the other slide keeps its own resolution (0.25 um/px)."""
    from wsiscan.formats.tissue_mask import read_tissue_mask

    (workdir / "slides").mkdir()
    write_tiff(workdir / "slides" / "dpi72.tif", he_image(512, 640), mpp=25400 / 72)
    write_tiff(workdir / "slides" / "ok.tif", he_image(512, 640, seed=1), mpp=0.25)
    rows = "".join(f"{s}\tslides/{s}.tif\t\tnormal\ttest\n" for s in ("dpi72", "ok"))
    (workdir / "config" / "slides.tsv").write_text(HEADER + rows)
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cfg["slide"]["mpp_fallback"] = 0.5
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_snakemake(workdir, "--cores", "2", "results/dpi72/tissue.png", "results/ok/tissue.png")
    logs = workdir / "results" / "logs" / "tissue_mask"
    assert "352.778 um/px is not a slide's" in (logs / "dpi72.log").read_text()
    assert "using slide.mpp_fallback 0.5 um/px" in (logs / "dpi72.log").read_text()
    assert "mpp_fallback" not in (logs / "ok.log").read_text()
    for sid, mpp in (("dpi72", 0.5), ("ok", 0.25)):
        mask = workdir / "results" / sid / "tissue.png"
        assert read_tissue_mask(mask, sid)[1]["slide_mpp"] == pytest.approx(mpp)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "WSISCAN_MALLOC_TUNING": "0"}


def test_shared_memory_exhausted_in_inference_gives_the_remedy(tmp_path, done, model_pt):
    """infer with a reading process under a 1 MB /dev/shm (a private mount namespace; a batch
    of four 388 px blocks is 1.7 MB): one line naming the slide, the cause and the remedy."""
    r = Result(tmp_path, done.slide, "s1")
    argv = [str(a) for a in stage_args(r, "infer", model_pt)]
    argv[argv.index("--rois") + 1] = str(done.rois)
    argv[argv.index("--workers") + 1] = "1"
    script = 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(BIN / "wsiscan"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_subprocess_env())
    if proc.returncode != 0 and "wsiscan infer" not in proc.stderr:
        pytest.skip(f"cannot mount a private /dev/shm here: {proc.stderr.strip()[-300:]}")
    assert_one_line_error(
        proc.returncode, proc.stderr, "infer", "slide 's1'", "shared memory", "/dev/shm holds 1 MB",
        "--shm-size", "infer.batch_size", "infer.workers: 0",
    )  # fmt: skip
    assert not r.tiles.exists()


# -- checkpoints (issue 15) ------------------------------------------------------------------------
def check_model_argv(model: Path, record: Path) -> list[str | Path]:
    """``wsiscan check_model`` of ``model`` for the scan geometry of these tests."""
    geometry = ["--n", str(N), "--alpha", str(ALPHA)]
    return ["check_model", "--model", model, "--out-record", record, *geometry]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("random", ["not a torch file", "zip archive"]),
        ("truncated", ["not a readable torch file", "truncated or damaged"]),
        ("nan", ["holds NaN or infinite values"]),
        ("width", ["shape", "width=0.25"]),
        ("arch", ["unknown architecture"]),
    ],
)
def test_check_model_refuses_a_bad_checkpoint(capsys, tmp_path, model_pt, case, words):
    """The workflow's check_model job (upstream of every infer job): one line naming the model
    file and the cause, and no record."""
    raw = torch.load(model_pt, weights_only=True)
    bad = tmp_path / f"{case}.pt"
    if case == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif case == "truncated":
        bad.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    elif case == "nan":
        raw["state_dict"]["features.0.weight"][0, 0, 0, 0] = float("nan")
        torch.save(raw, bad)
    elif case == "width":
        raw["config"]["width"] = 0.25
        torch.save(raw, bad)
    else:
        raw["config"]["arch"] = "resnet50"
        torch.save(raw, bad)
    record = tmp_path / "check.json"
    rc, err = run_cli(capsys, *check_model_argv(bad, record))
    line = assert_one_line_error(rc, err, "check_model", f"model file {bad}", *words)
    assert "weights_only` set to `False" not in line and "pickled" not in line
    assert not record.exists()


def test_nan_weights_are_refused_at_load_by_infer(capsys, tmp_path, done, model_pt):
    raw = torch.load(model_pt, weights_only=True)
    raw["state_dict"]["features.0.bias"][:] = float("inf")
    bad = tmp_path / "inf.pt"
    torch.save(raw, bad)
    r = Result(tmp_path, done.slide, "s1")
    argv = stage_args(r, "infer", bad)
    argv[argv.index("--rois") + 1] = done.rois
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "infer", "inf.pt", "features.0.bias", "NaN or infinite")
    assert not r.tiles.exists()


def test_a_checkpoint_claiming_a_huge_width_allocates_nothing(tmp_path, model_pt):
    """A checkpoint whose stored config says width 1000 (147 GB of weights at float32) is
    refused before any network is built: in a process limited to 6 GiB of address space the
    message is the checkpoint's, not an allocation failure."""
    raw = torch.load(model_pt, weights_only=True)
    raw["config"]["width"] = 1000.0
    bad = tmp_path / "huge.pt"
    torch.save(raw, bad)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from wsiscan.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [str(a) for a in check_model_argv(bad, tmp_path / "check.json")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
        env=_subprocess_env(),
    )  # fmt: skip
    line = assert_one_line_error(proc.returncode, proc.stderr, "check_model", "huge.pt", "width")
    assert "1000" in line and "allocate" not in line


def test_inference_uses_the_checkpoints_own_width(capsys, tmp_path, done):
    """model.width configures the networks init_model and train_round build; a checkpoint of
    another width is valid for check_model and infer, which scan with its own width."""
    from wsiscan.model import init_model
    from wsiscan.params import InitModelParams

    other = tmp_path / "w0625.pt"
    init_model(other, InitModelParams(width=0.0625, seed=1))
    record = tmp_path / "check.json"
    rc, err = run_cli(capsys, *check_model_argv(other, record))
    assert rc == 0, err
    checked = json.loads(record.read_text())
    assert checked["width"] == 0.0625 and checked["scan_geometry"]["n"] == N
    r = Result(tmp_path, done.slide, "s1")
    argv = stage_args(r, "infer", other)
    argv[argv.index("--rois") + 1] = done.rois
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    with h5py.File(r.tiles) as f:
        assert f.attrs["model_width"] == 0.0625


# -- the sample sheet (issue 15) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("slide_id", "words"),
    [
        ("-rf", ["line 3", "'-rf'", "must not start with '-'"]),
        ("--help", ["line 3", "must not start with '-'"]),
        ("cohort", ["line 3", "'cohort' is reserved", "results/cohort"]),
        ("Logs", ["line 3", "reserved", "results/logs"]),
        ("train", ["line 3", "reserved"]),
        ("model", ["line 3", "reserved"]),
        ("benchmarks", ["line 3", "reserved"]),
    ],
)
def test_sheet_refuses_option_like_and_reserved_ids(tmp_path, slide_id, words):
    from wsiscan.config import load_samples

    rows = ["ok\tdata/demo/ok.tif\t\tnormal\ttest", f"{slide_id}\tdata/demo/x.tif\t\tnormal\ttest"]
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + "".join(r + "\n" for r in rows))
    with pytest.raises(ConfigError) as exc:
        load_samples(sheet, base_dir=tmp_path)
    for word in words:
        assert word in str(exc.value)


def test_sheet_reads_hash_as_data_and_names_what_a_path_is(tmp_path):
    from wsiscan.config import load_samples

    folder = tmp_path / "run #3"
    folder.mkdir()
    write_tiff(folder / "a#1.tif", he_image(256, 256))
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(
        HEADER
        + "# a comment line\n"
        + "a1\trun #3/a#1.tif\t\tnormal\ttest\n\n"
        + "b1\trun #3\t\tnormal\ttest\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_samples(sheet, base_dir=tmp_path)
    assert "line 5 (slide_id 'b1')" in str(exc.value) and "is a directory" in str(exc.value)
    sheet.write_text(HEADER + "# a comment line\na1\trun #3/a#1.tif\t\tnormal\ttest\n")
    samples = load_samples(sheet, base_dir=tmp_path)
    assert samples.loc["a1", "path"] == "run #3/a#1.tif" and samples.loc["a1", "label"] == "normal"
    os.mkfifo(tmp_path / "pipe.tif")
    sheet.write_text(HEADER + "p1\tpipe.tif\t\tnormal\ttest\n")
    with pytest.raises(ConfigError, match=r"line 2 .*'pipe.tif' is a named pipe \(FIFO\)"):
        load_samples(sheet, base_dir=tmp_path)
