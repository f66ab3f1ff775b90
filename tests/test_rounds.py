"""The figures that keep moving after AUC and FROC saturate (issue 21): false positives per normal
slide in metrics.json, and rounds.tsv setting every round's evaluation side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from wsiscan.errors import SlideError
from wsiscan.evaluate import fp_per_normal_slide, round_summary
from wsiscan.params import RoundSummaryParams


def metrics(path: Path, round_: int | None, fp: float | None, sens: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    at = {k: sens for k in ("0.25", "0.5", "1", "2", "4", "8")}
    record = {
        "model": {"path": f"results/train/round{round_}/model.pt", "round": round_},
        "n_slides": 14,
        "auc": 1.0,
        "froc": sens,
        "fp_per_normal_slide": fp,
        "sensitivity_at_fp": at,
    }
    path.write_text(json.dumps(record))
    return path


def test_round_summary_orders_the_rounds(tmp_path: Path):
    late = metrics(tmp_path / "cohort" / "metrics.json", 2, 0.25, 0.9)
    early = metrics(tmp_path / "rounds" / "round1" / "metrics.json", 1, 8.75, 0.5)
    table = round_summary([late, early], tmp_path / "rounds.tsv", RoundSummaryParams())
    on_disk = pd.read_csv(tmp_path / "rounds.tsv", sep="\t")
    assert on_disk["round"].tolist() == [1, 2] == table["round"].tolist()
    assert on_disk["fp_per_normal_slide"].tolist() == [8.75, 0.25]
    assert on_disk["sensitivity_at_0.25_fp"].tolist() == [0.5, 0.9]


def test_round_summary_refuses_other_files(tmp_path: Path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"auc": 1}')
    with pytest.raises(SlideError, match="not a metrics.json"):
        round_summary([bad], tmp_path / "rounds.tsv", RoundSummaryParams())
    assert not (tmp_path / "rounds.tsv").exists()


def test_fp_per_normal_slide_counts_lesion_points_on_normal_slides():
    from types import SimpleNamespace

    def result(label: str, n: int):
        return SimpleNamespace(label=label, lesions=pd.DataFrame({"confidence": [0.9] * n}))

    assert (
        fp_per_normal_slide([result("normal", 3), result("normal", 0), result("tumor", 9)]) == 1.5
    )
    assert fp_per_normal_slide([result("tumor", 2)]) is None
