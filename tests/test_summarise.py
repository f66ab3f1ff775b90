"""Results a pathologist can use: size categories, pN stages, the operating threshold, the cohort
summary (labelled or not), the sheet of a folder of slides and the optional sheet columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from wsiscan.config import load_samples
from wsiscan.detect import detect, mask_regions
from wsiscan.errors import ConfigError
from wsiscan.evaluate import operating_threshold
from wsiscan.faults import write_failure_record
from wsiscan.formats.summary import read_patients_tsv, read_summary_tsv
from wsiscan.params import DetectParams, SummariseParams
from wsiscan.sheet import build_folder_sheet
from wsiscan.staging import (
    KAPPA_STAGES,
    pn_stage,
    read_camelyon17_csv,
    size_category,
    stage_kappa,
)
from wsiscan.summarise import summarise

from .test_detect import write_probmap

STRIDE, MPP = 16, 0.5  # one map cell: 8 um


# -- size categories -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cells", "category"),
    [(24, "itc"), (25, "itc"), (26, "micro"), (250, "micro"), (251, "macro")],
)
def test_categories_of_lesions_of_known_diameter(cells: int, category: str):
    """A row of n cells of 8 um measures n * 8 um: 0.192, 0.2 (ITC: up to 0.2 mm), 0.208 (micro),
    2.0 (micro: up to 2 mm) and 2.008 mm (macro)."""
    mask = np.zeros((20, cells + 10), bool)
    mask[10, 5 : 5 + cells] = True
    prob = np.where(mask, 0.9, 0.0).astype(np.float32)
    (region,) = mask_regions(prob, mask, STRIDE, MPP)
    assert region.longest_diameter_um == pytest.approx(cells * 8.0)
    assert region.category == category


@pytest.mark.parametrize(
    ("diameter_mm", "category"), [(0.15, "itc"), (1.2, "micro"), (3.0, "macro")]
)
def test_categories_of_round_lesions(diameter_mm: float, category: str):
    """A disk of a given diameter: its longest diameter within one cell of it."""
    from skimage.draw import disk

    r_cells = diameter_mm * 1000 / 8 / 2
    side = int(2 * r_cells) + 10
    mask = np.zeros((side, side), bool)
    rr, cc = disk((side / 2, side / 2), r_cells, shape=mask.shape)
    mask[rr, cc] = True
    (region,) = mask_regions(mask.astype(np.float32), mask, STRIDE, MPP)
    assert abs(region.longest_diameter_um - diameter_mm * 1000) <= 2 * 8.0
    assert region.category == category
    assert size_category(None) == "negative"


# -- pN stages and kappa ---------------------------------------------------------------------------
PATIENTS = [  # slide categories of the five nodes -> pN stage (Camelyon17 rules)
    (["negative"] * 5, "pN0"),
    (["itc", "negative", "itc", "negative", "negative"], "pN0(i+)"),
    (["micro", "itc", "negative", "negative", "negative"], "pN1mi"),
    (
        ["micro", "micro", "micro", "micro", "negative"],
        "pN1mi",
    ),  # no macro: pN1mi whatever the count
    (["macro", "negative", "negative", "negative", "negative"], "pN1"),
    (["macro", "micro", "micro", "itc", "itc"], "pN1"),  # ITC nodes are not positive
    (["macro", "micro", "micro", "micro", "negative"], "pN2"),
    (["macro"] * 5, "pN2"),
    (["macro"] * 10, "pN3"),
]


@pytest.mark.parametrize(("categories", "stage"), PATIENTS)
def test_pn_stage_rules(categories, stage):
    assert pn_stage(categories) == stage


def test_kappa_is_scikit_learns_quadratic_kappa():
    rng = np.random.default_rng(3)
    truth = list(rng.choice(KAPPA_STAGES, 40))
    pred = list(rng.choice(KAPPA_STAGES, 40))
    expected = cohen_kappa_score(truth, pred, labels=list(KAPPA_STAGES), weights="quadratic")
    assert stage_kappa(truth, pred) == pytest.approx(expected, abs=0)
    assert stage_kappa(truth, truth) == pytest.approx(1.0)
    assert stage_kappa([], []) is None and stage_kappa(["pN0"], ["pN0"]) is None


def test_camelyon17_csv(tmp_path):
    path = tmp_path / "stage_labels.csv"
    path.write_text(
        "patient,stage\npatient_004.zip,pN1\npatient_004_node_0.tif,negative\n"
        "patient_004_node_4.tif,macro\npatient_005.zip,pN0(i+)\npatient_005_node_1.tif,itc\n"
    )
    slides, patients = read_camelyon17_csv(path)
    assert slides == {"patient_004_node_0": "negative", "patient_004_node_4": "macro",
                      "patient_005_node_1": "itc"}  # fmt: skip
    assert patients == {"patient_004": "pN1", "patient_005": "pN0(i+)"}
    path.write_text("patient,stage\npatient_004_node_0.tif,huge\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_camelyon17_csv(path)


# -- the operating threshold -----------------------------------------------------------------------
def test_operating_threshold():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.05])
    op = operating_threshold(y, s, "sensitivity", 0.75)
    assert op["threshold"] == 0.6 and op["sensitivity"] == 0.75 and op["specificity"] == 0.75
    assert operating_threshold(y, s, "sensitivity", 1.0)["threshold"] == 0.3
    youden = operating_threshold(y, s, "youden", 0.95)
    assert youden["threshold"] == 0.8 and youden["sensitivity"] == 0.5
    assert youden["specificity"] == 1.0  # J = 0.5, the highest of the curve (0.6 gives 0.5 too)
    assert operating_threshold(np.zeros(3), s[:3], "sensitivity", 0.9) is None
    assert operating_threshold(np.ones(3), s[:3], "youden", 0.9) is None


# -- the cohort summary ----------------------------------------------------------------------------
def _scan(results: Path, sid: str, lesion_cells: list[tuple[int, float]]) -> None:
    """results/<sid>/score.json of a map holding rows of ``n`` cells at probability ``p``."""
    prob = np.zeros((60, 300), np.float32)
    for k, (n, p) in enumerate(lesion_cells):
        prob[5 + 5 * k, 5 : 5 + n] = p
    folder = results / sid
    folder.mkdir(parents=True)
    pm = write_probmap(folder / "probmap.h5", prob, stride_px=STRIDE, mpp=MPP, slide_id=sid)
    outs = [folder / n for n in ("lesions.csv", "score.json", "lesions.geojson", "lesions.xml")]
    detect(pm, *outs, DetectParams(), slide_id=sid)


def _sheet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_unlabelled_cohort_summary_with_a_failed_slide_and_patients(tmp_path):
    results = tmp_path / "results"
    _scan(results, "n0", [(30, 0.4)])  # below the threshold: negative
    _scan(results, "n1", [(20, 0.8)])  # 0.16 mm: ITC
    _scan(results, "n2", [(100, 0.9), (200, 0.6)])  # the 1.6 mm one is below the threshold: 0.8 mm
    _scan(results, "n3", [(300, 0.95)])  # 2.4 mm: macro
    write_failure_record(results / "n4" / "FAILED.json", stage="infer", slide_id="n4",
                         cause="slide 'n4': file unreadable", error="SlideError")  # fmt: skip
    rows = [
        {"slide_id": s, "path": f"{s}.svs", "annotation": "", "label": "unknown", "split": "test",
         "patient": p, "true_category": t}
        for s, p, t in [("n0", "pa", "negative"), ("n1", "pa", "itc"), ("n2", "pb", "micro"),
                        ("n3", "pb", "micro"), ("n4", "pc", "")]
    ]  # fmt: skip
    sheet = _sheet(tmp_path / "sheet.tsv", rows)
    out = [tmp_path / n for n in ("summary.tsv", "patients.tsv", "staging.json")]
    params = SummariseParams(threshold=0.7)
    summarise(sheet, results, *out, params)
    table = read_summary_tsv(out[0]).set_index("slide_id")
    assert table["call"].to_dict() == {"n0": "negative", "n1": "positive", "n2": "positive",
                                       "n3": "positive", "n4": ""}  # fmt: skip
    assert table["category"].to_dict() == {"n0": "negative", "n1": "itc", "n2": "micro",
                                           "n3": "macro", "n4": ""}  # fmt: skip
    assert table.loc["n2", "detected_lesions"] == "1"
    assert float(table.loc["n2", "largest_diameter_mm"]) == pytest.approx(0.8)
    assert (table.loc["n4", "status"], table.loc["n4", "failed_stage"]) == ("failed", "infer")
    assert "unreadable" in table.loc["n4", "failure_cause"]
    assert set(table["threshold"]) == {"0.7"}
    patients = read_patients_tsv(out[1]).set_index("patient")
    assert patients["pn_stage"].to_dict() == {"pa": "pN0(i+)", "pb": "pN1", "pc": ""}
    assert (
        patients.loc["pb", "true_pn_stage"] == "pN1mi"
        and patients.loc["pa", "true_pn_stage"] == "pN0(i+)"
    )
    assert "n4" in patients.loc["pc", "note"]
    staging = json.loads(out[2].read_text())
    assert staging["operating_threshold"]["source"] == "operating.threshold"
    assert staging["slides"]["n"] == 4 and staging["slides"]["accuracy"] == 0.75
    assert staging["slides"]["confusion"]["matrix"][2] == [0, 0, 1, 1]  # true micro: one macro
    expected = cohen_kappa_score(["pN0(i+)", "pN1mi"], ["pN0(i+)", "pN1"],
                                 labels=list(KAPPA_STAGES), weights="quadratic")  # fmt: skip
    assert staging["patients"]["kappa_quadratic"] == pytest.approx(expected)

    # no threshold and no labelled slide: detect.threshold, and the summary says so
    summarise(sheet, results, *out, SummariseParams())
    staging = json.loads(out[2].read_text())
    assert staging["operating_threshold"]["threshold"] == 0.5
    assert "no labelled slide" in staging["operating_threshold"]["source"]


def test_labelled_cohort_threshold_is_chosen_on_its_slides(tmp_path):
    results = tmp_path / "results"
    for sid, p in (("t1", 0.9), ("t2", 0.7), ("o1", 0.6), ("o2", 0.3)):
        _scan(results, sid, [(10, p)])
    rows = [{"slide_id": s, "path": f"{s}.svs", "annotation": "a.xml" if lab == "tumor" else "",
             "label": lab, "split": "test"}
            for s, lab in (("t1", "tumor"), ("t2", "tumor"), ("o1", "normal"), ("o2", "unknown"))]  # fmt: skip
    out = [tmp_path / n for n in ("summary.tsv", "patients.tsv", "staging.json")]
    summarise(_sheet(tmp_path / "s.tsv", rows), results, *out, SummariseParams())
    op = json.loads(out[2].read_text())["operating_threshold"]
    assert op["threshold"] == pytest.approx(0.7) and op["n_tumor"] == 2 and op["n_normal"] == 1
    table = read_summary_tsv(out[0]).set_index("slide_id")
    assert table["call"].tolist() == ["positive", "positive", "negative", "negative"]
    assert list(read_patients_tsv(out[1]).columns)[:2] == ["patient", "n_slides"]


# -- sheets ----------------------------------------------------------------------------------------
def test_folder_sheet_and_optional_columns(tmp_path, cmu_svs):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("patient_001_node_0.svs", "patient_001_node_1.svs", "patient 002 (x).svs"):
        (folder / name).symlink_to(cmu_svs)
    (folder / "notes.txt").write_text("not a slide")
    out = tmp_path / "sheet.tsv"
    df = build_folder_sheet(folder, out, patient_pattern=r"(patient_[0-9]+)")
    assert df["slide_id"].tolist() == [
        "patient_002__x_",
        "patient_001_node_0",
        "patient_001_node_1",
    ]
    assert set(df["label"]) == {"unknown"} and set(df["split"]) == {"test"}
    samples = load_samples(out)
    assert samples["patient"].tolist() == ["", "patient_001", "patient_001"]
    bad = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    bad["true_category"] = ["macro", "huge", ""]
    header, *body = bad.to_csv(sep="\t", index=False).splitlines()
    out.write_text("\n".join([header, "# a comment line", *body]) + "\n")
    with pytest.raises(ConfigError, match="line 4 .*true_category"):  # the file's line
        load_samples(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no slide files"):
        build_folder_sheet(tmp_path / "empty", None)
