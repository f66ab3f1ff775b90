"""``wsiscan sheet``: the sample sheet from a fake tree of the public Camelyon16 layout."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from wsiscan.cli import main
from wsiscan.errors import ConfigError
from wsiscan.sheet import build_camelyon16_sheet, read_camelyon16_reference

REFERENCE = """Test_001,Tumor,Macro,Primary
Test_002,Normal
Test_003,Tumor,Micro,Primary
Test_049,Tumor,Macro,Primary

"""


def fake_camelyon16(root: Path, reference: str = REFERENCE) -> Path:
    """Empty files in the Camelyon16 layout (the builder never opens a slide)."""
    files = [
        "training/tumor/tumor_001.tif",
        "training/tumor/tumor_002.tif",
        "training/tumor/tumor_071.tif",
        "training/normal/normal_001.tif",
        "training/normal/normal_002.tif",
        "training/normal/normal_101.tif",
        "training/normal/readme.txt",
        "training/lesion_annotations/tumor_001.xml",
        "training/lesion_annotations/tumor_002.xml",
        "training/lesion_annotations/tumor_071.xml",
        "testing/images/test_001.tif",
        "testing/images/test_002.tif",
        "testing/images/test_003.tif",
        "testing/images/test_049.tif",
        "testing/lesion_annotations/test_001.xml",
        "testing/lesion_annotations/test_003.xml",
        "testing/lesion_annotations/test_049.xml",
    ]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    (root / "testing" / "reference.csv").write_text(reference)
    return root


def test_sheet_from_the_camelyon16_layout(tmp_path):
    root = fake_camelyon16(tmp_path / "CAMELYON16")
    out = tmp_path / "config" / "slides.tsv"
    df = build_camelyon16_sheet(root, out)
    back = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(back, df)
    assert list(df.columns) == ["slide_id", "path", "annotation", "label", "split", "centre"]
    rows = df.set_index("slide_id")
    assert list(rows.index) == [
        "tumor_001", "tumor_002", "tumor_071", "normal_001", "normal_002", "normal_101",
        "test_001", "test_002", "test_003", "test_049",
    ]  # fmt: skip
    # the two training centres from the file names; the test slides' names do not say
    centres = rows["centre"].to_dict()
    assert [centres[s] for s in ("tumor_001", "tumor_071", "normal_002", "normal_101")] == [
        "RUMC", "UMCU", "RUMC", "UMCU",
    ]  # fmt: skip
    assert {centres[s] for s in rows.index if s.startswith("test_")} == {""}
    assert rows.loc["tumor_001", "label"] == "tumor" and rows.loc["tumor_001", "split"] == "train"
    assert rows.loc["tumor_001", "annotation"] == str(
        root / "training/lesion_annotations/tumor_001.xml"
    )
    assert (
        rows.loc["normal_002", "label"] == "normal" and rows.loc["normal_002", "annotation"] == ""
    )
    assert rows.loc["normal_002", "path"] == str(root / "training/normal/normal_002.tif")
    assert rows.loc["test_001", "label"] == "tumor" and rows.loc["test_001", "split"] == "test"
    assert rows.loc["test_002", "label"] == "normal" and rows.loc["test_002", "annotation"] == ""
    assert rows.loc["test_003", "annotation"].endswith("testing/lesion_annotations/test_003.xml")
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_the_sheet_passes_the_workflow_validation(tmp_path):
    from wsiscan.config import load_samples

    root = fake_camelyon16(tmp_path / "CAMELYON16")
    build_camelyon16_sheet(root, tmp_path / "slides.tsv")
    df = load_samples(tmp_path / "slides.tsv")
    assert len(df) == 10 and df.loc["tumor_071", "centre"] == "UMCU"


def test_test_slides_without_reference_are_unknown(tmp_path):
    root = fake_camelyon16(tmp_path / "c16")
    (root / "testing" / "reference.csv").unlink()
    df = build_camelyon16_sheet(root, None)
    assert set(df.loc[df["split"] == "test", "label"]) == {"unknown"}
    assert set(df.loc[df["split"] == "train", "label"]) == {"tumor", "normal"}
    with pytest.raises(ConfigError, match="not found"):
        build_camelyon16_sheet(root, None, reference_csv=root / "nope.csv")


@pytest.mark.parametrize(
    "text",
    [
        "image,type,size,source\nTest_001,Tumor,Macro,Primary\nTest_002,Normal,,\n",
        '"Test_001";"Tumor";"Macro"\r\n"Test_002";"Normal"\r\n',
        "\ufefftest_001.tif\ttumour\nTEST_002\tNORMAL\n# comment\n",
    ],
)
def test_reference_parser_is_tolerant(tmp_path, text):
    path = tmp_path / "reference.csv"
    path.write_text(text, encoding="utf-8")
    assert read_camelyon16_reference(path) == {"test_001": "tumor", "test_002": "normal"}


def test_reference_parser_rejects_bad_rows(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text("Test_001,Tumor\nTest_002,Maybe\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_camelyon16_reference(path)
    path.write_text("Test_001,Tumor\ntest_001,Normal\n")
    with pytest.raises(ConfigError, match="both"):
        read_camelyon16_reference(path)


def test_bad_ids_and_empty_trees_are_config_errors(tmp_path):
    root = fake_camelyon16(tmp_path / "c16")
    (root / "training/normal/normal 003.tif").write_bytes(b"")
    with pytest.raises(ConfigError, match="normal 003"):
        build_camelyon16_sheet(root, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no slides"):
        build_camelyon16_sheet(tmp_path / "empty", None)
    with pytest.raises(ConfigError, match="not a folder"):
        build_camelyon16_sheet(tmp_path / "missing", None)


def test_cli_sheet(tmp_path, capsys):
    root = fake_camelyon16(tmp_path / "c16")
    out = tmp_path / "slides.tsv"
    assert main(["sheet", "--root", str(root), "--out", str(out)]) == 0
    assert len(pd.read_csv(out, sep="\t")) == 10
    assert main(["sheet", "--root", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "wsiscan sheet: error:" in capsys.readouterr().err
