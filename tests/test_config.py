"""Config and sample-sheet validation: every error names the key or the row, before any job runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from wsiscan.config import load_samples, validate_config
from wsiscan.errors import ConfigError

from .conftest import REPO, run_snakemake

HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid():
    cfg = validate_config(default_config())
    assert cfg["scan"]["alpha"] in (1, 2, 4)


def test_defaults_are_filled_in():
    cfg = validate_config({"samples": "x.tsv"})
    assert cfg["scan"]["n"] == 82 and cfg["model"]["width"] == 1.0
    assert cfg["tissue"]["method"] == "saturation"


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("tissue", "closing_diameter_um"), "fifty", ["tissue.closing_diameter_um", "not of type"]),
        (("tissue", "closing_diameter_um"), -1.0, ["tissue.closing_diameter_um", "minimum"]),
        (
            ("tissue", "closing_um"),
            50.0,
            ["invalid config: renamed key(s): tissue.closing_um is now tissue.closing_diameter_um"],
        ),
        (("scan", "alpha"), 3, ["scan.alpha", "3"]),
        (("scan", "n"), -2, ["scan.n"]),
        (("infer", "device"), "tpu", ["infer.device"]),
        (("tissue", "colour"), 1, ["tissue", "'colour' was unexpected"]),
        (("bogus",), {}, ["'bogus' was unexpected"]),
    ],
)
def test_config_errors_name_the_key(path, value, words):
    cfg = copy.deepcopy(default_config())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    for word in words:
        assert word in str(exc.value)


def write_sheet(tmp_path: Path, rows: list[str]) -> Path:
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + "".join(r + "\n" for r in rows))
    return sheet


def test_sheet_demo_rows_need_no_files(tmp_path):
    sheet = write_sheet(
        tmp_path,
        [
            "a\tdata/demo/a.tif\tdata/demo/a.xml\ttumor\ttrain",
            "b\tdata/demo/b.tif\t\tnormal\ttest",
        ],
    )
    df = load_samples(sheet, base_dir=tmp_path)
    assert list(df.index) == ["a", "b"]
    assert df.loc["b", "annotation"] == ""


def test_sheet_real_files_are_checked(tmp_path):
    (tmp_path / "s1.svs").write_bytes(b"x")
    ok = write_sheet(tmp_path, ["s1\ts1.svs\t\tnormal\ttest"])
    assert load_samples(ok, base_dir=tmp_path).index.tolist() == ["s1"]
    bad = write_sheet(tmp_path, ["s1\ts1.svs\t\tnormal\ttest", "s2\tmissing.svs\t\tnormal\ttest"])
    with pytest.raises(ConfigError, match=r"line 3 \(slide_id 's2'\): path file 'missing.svs'"):
        load_samples(bad, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("../x\tdata/demo/x.tif\t\tnormal\ttest", ["line 2", "slide_id", "does not match"]),
        ("a/b\tdata/demo/a.tif\t\tnormal\ttest", ["line 2", "does not match"]),
        ("..\tdata/demo/...tif\t\tnormal\ttest", ["line 2", "slide_id"]),
        ("a\tdata/demo/a.tif\t\tmaybe\ttest", ["line 2", "label", "'maybe'"]),
        ("a\tdata/demo/a.tif\t\tnormal\tvalidation", ["line 2", "split"]),
        ("a\tx.svs\t\tnormal\ttest", ["line 2", "path file 'x.svs' not found"]),
        ("a\tx.svs\tx.xml\ttumor\ttest", ["line 2", "path file 'x.svs' not found"]),
    ],
)
def test_sheet_row_errors_name_the_row(tmp_path, row, words):
    with pytest.raises(ConfigError) as exc:
        load_samples(write_sheet(tmp_path, [row]), base_dir=tmp_path)
    for word in words:
        assert word in str(exc.value)


def test_sheet_tumour_without_annotation(tmp_path):
    (tmp_path / "t.svs").write_bytes(b"x")
    sheet = write_sheet(tmp_path, ["t\tt.svs\t\ttumor\ttest"])
    with pytest.raises(ConfigError, match="label is tumor but no annotation"):
        load_samples(sheet, base_dir=tmp_path)


def test_sheet_duplicate_ids(tmp_path):
    sheet = write_sheet(
        tmp_path,
        [
            "a\tdata/demo/a.tif\t\tnormal\ttest",
            "b\tdata/demo/b.tif\t\tnormal\ttest",
            "a\tdata/demo/a.tif\t\tnormal\ttrain",
        ],
    )
    with pytest.raises(ConfigError, match=r"duplicate slide_id \['a'\] on lines 2, 4"):
        load_samples(sheet, base_dir=tmp_path)


def test_sheet_wrong_columns(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("id\tpath\n1\tx\n")
    with pytest.raises(ConfigError, match="columns must be"):
        load_samples(sheet)


def test_snakemake_stops_before_any_job(workdir):
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cfg["scan"]["alpha"] = 3
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(workdir, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "invalid config: scan.alpha" in proc.stdout + proc.stderr
    assert not (workdir / "results").exists() and not (workdir / "data").exists()


def test_dry_run_lists_demo_dag(workdir):
    proc = run_snakemake(workdir, "-n", "--cores", "1", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    for rule in ("synth_slide", "tissue_mask", "roi_grid", "infer", "stitch", "detect", "evaluate"):
        assert rule in out, f"{rule} missing from the demo DAG:\n{out}"


# -- issue 15 --------------------------------------------------------------------------------------
def test_duplicate_keys_are_refused(tmp_path):
    from wsiscan.config import check_config_files

    ok = tmp_path / "ok.yaml"
    ok.write_text("samples: x.tsv\nscan: {n: 4, alpha: 2}\nevaluate:\n  exclude: [a, a]\n")
    check_config_files([ok])  # a list may repeat a value
    for text, key, lines in (
        ("samples: x.tsv\nscan:\n  n: 4\n  alpha: 2\n  n: 8\n", "scan.n", "3 and 5"),
        ("scan: {n: 4}\nsamples: x.tsv\nscan: {alpha: 2}\n", "scan", "1 and 3"),
        ('{"train": {"augment": {"hue": 0.1, "hue": 0.2}}}', "train.augment.hue", "1 and 1"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(
            ConfigError, match=rf"bad.yaml: key '{key}' is set twice \(lines {lines}\)"
        ):
            check_config_files([ok, bad])


def test_workflow_refuses_duplicate_keys_and_an_empty_scan(workdir):
    """Before any job: a --configfile that sets a key twice (YAML keeps the last value), and a
    sheet without a slide of evaluate.split while model.checkpoint is set (nothing to scan and
    nothing to train: the run would do nothing and say nothing)."""
    mine = workdir / "config" / "mine.yaml"
    text = (workdir / "config" / "config.yaml").read_text()
    mine.write_text(text + "\ndetect:\n  threshold: 0.9\n")
    proc = run_snakemake(workdir, "--configfile", str(mine), "-n", "--cores", "1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "key 'detect' is set twice" in out and "mine.yaml" in out

    cfg = yaml.safe_load(text)
    cfg["model"]["checkpoint"] = "results/model/trained.pt"
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    sheet = (workdir / "config" / "slides.tsv").read_text().splitlines()
    train_only = [sheet[0]] + [row for row in sheet[1:] if row.split("\t")[4] == "train"][:2]
    (workdir / "config" / "slides.tsv").write_text("\n".join(train_only) + "\n")
    proc = run_snakemake(workdir, "-n", "--cores", "1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "nothing to do: evaluate.split is 'test'" in out and "model.checkpoint is set" in out
    assert not (workdir / "results").exists()
    # without model.checkpoint such a sheet trains the model, and says so
    cfg["model"]["checkpoint"] = None
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(workdir, "-n", "--cores", "1")
    out = proc.stdout + proc.stderr
    assert "no slide of split 'test' to scan: building the model only" in out
    assert "train_round" in out and "rule infer" not in out


def test_nothing_to_scan_only_when_no_training_runs_either():
    from wsiscan.dag import nothing_to_scan

    config = validate_config({"samples": "s.tsv"})
    assert nothing_to_scan(config, ["train", "train"]) is None  # training runs
    config["model"]["checkpoint"] = "m.pt"
    assert "splits there: train" in nothing_to_scan(config, ["train"])
    assert nothing_to_scan(config, ["train", "test"]) is None
    config["evaluate"]["split"] = "train"
    assert nothing_to_scan(config, ["train"]) is None


def test_sheet_centre_column_is_optional_and_validated(tmp_path):
    rows = ["a\tdata/demo/a.tif\t\tnormal\ttest", "b\tdata/demo/b.tif\t\tnormal\ttest"]
    df = load_samples(write_sheet(tmp_path, rows), base_dir=tmp_path)
    assert "centre" not in df.columns  # an absent optional column is not filled in
    sheet = tmp_path / "centres.tsv"
    sheet.write_text(
        HEADER.rstrip("\n") + "\tcentre\n# a comment line\n"
        + "".join(f"{r}\t{c}\n" for r, c in zip(rows, ("RUMC", ""), strict=True))
    )  # fmt: skip
    df = load_samples(sheet, base_dir=tmp_path)
    assert df["centre"].tolist() == ["RUMC", ""]
    sheet.write_text(sheet.read_text().replace("\tRUMC\n", "\tRad boud\n"))
    with pytest.raises(ConfigError, match=r"line 3 \(slide_id 'a'\): centre: 'Rad boud' does not"):
        load_samples(sheet, base_dir=tmp_path)
