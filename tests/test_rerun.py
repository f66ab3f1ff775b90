"""Re-running one failed slide and config-edited cohort runs, with the local executor.

A small cohort (two synthetic demo slides and one real slide file) runs once with a broken slide file
under --keep-going (module fixture); each test works on a copy of that state:

- fixing the slide and naming its target re-runs only that slide's jobs and the cohort evaluation;
  every file of the other slides keeps its modification time;
- changing detect.threshold re-runs detect (all slides) and evaluate, nothing upstream; changing
  stitch.closing_radius_um re-runs stitch, detect and evaluate, nothing upstream.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from .conftest import DATA, REPO, run_snakemake

pytestmark = pytest.mark.slow

HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"
BROKEN = "bad"


def write_small_demo(
    workdir: Path, slides: list[tuple[str, str]], extra_rows: tuple[str, ...] = ()
) -> None:
    """Write a fast demo config into ``workdir/config``: the synthetic slides ``(id, label)`` of the
    test split (small sizes, n = 8, untrained model: train.rounds 0), plus raw sheet rows."""
    config_dir = workdir / "config"
    config_dir.mkdir(exist_ok=True)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["samples"] = "config/slides.tsv"
    cfg["demo"].update(width_px=2500, height_px=2000)
    cfg["scan"]["n"] = 8
    cfg["train"]["rounds"] = 0
    cfg["infer"].update(workers=1, batch_size=4)
    cfg["evaluate"]["bootstrap"] = 50
    (config_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = []
    for sid, label in slides:
        annotation = f"data/demo/{sid}.xml" if label == "tumor" else ""
        rows.append(f"{sid}\tdata/demo/{sid}.tif\t{annotation}\t{label}\ttest\n")
    rows += [r + "\n" for r in extra_rows]
    (config_dir / "slides.tsv").write_text(HEADER + "".join(rows))


def set_config(workdir: Path, section: str, key: str, value: object) -> None:
    """Change one key of ``workdir/config/config.yaml``."""
    path = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg[section][key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def job_stats(output: str) -> Counter:
    """The first "Job stats" table of a Snakemake log as ``{rule: count}`` (without the total)."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert match, f"no job stats in:\n{output}"
    return Counter({r: int(n) for r, n in re.findall(r"^(\S+)\s+(\d+)\s*$", match.group(1), re.M)})


def mtimes(root: Path) -> dict[str, int]:
    """Modification times (ns) of every file under ``root/results`` and ``root/data``."""
    out = {}
    for top in ("results", "data"):
        for path in (root / top).rglob("*"):
            if path.is_file():
                out[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return out


def belongs_to(rel: str, slide: str) -> bool:
    """True for a results/data path of slide ``slide`` (its folder, logs or benchmarks)."""
    parts = Path(rel).parts
    return (
        (len(parts) > 1 and parts[1] == slide)
        or Path(rel).stem == slide
        or Path(rel).name.startswith(f"{slide}.")
    )


@pytest.fixture(scope="module")
def broken_cohort(tmp_path_factory) -> Path:
    """A cohort run (keep-going) in which slide ``bad``'s file is not a slide: the others finish."""
    root = tmp_path_factory.mktemp("broken_cohort")
    (root / "slides").mkdir()
    (root / "slides" / f"{BROKEN}.svs").write_bytes(b"this is not a slide\n" * 100)
    write_small_demo(
        root,
        [("t1", "tumor"), ("n1", "normal")],
        extra_rows=(f"{BROKEN}\tslides/{BROKEN}.svs\t\tnormal\ttest",),
    )
    proc = run_snakemake(root, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0, "the broken slide must fail its job"
    assert "tissue_mask" in proc.stderr and f"slide={BROKEN}" in proc.stderr
    for sid in ("t1", "n1"):
        assert (root / "results" / sid / "lesions.csv").is_file(), proc.stderr
    assert not (root / "results" / BROKEN / "tissue.png").exists()
    assert not (root / "results" / "cohort" / "metrics.json").exists()
    log = (root / "results" / "logs" / "tissue_mask" / f"{BROKEN}.log").read_text()
    assert BROKEN in log and "error" in log.lower()
    return root


def fresh_copy(src: Path, dst: Path) -> Path:
    """Copy a cohort directory (with .snakemake metadata), keeping modification times."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def repaired_cohort(broken_cohort: Path, tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy of the broken cohort whose slide was fixed and re-run by naming its target and the
    evaluation. Returns the directory, the mtimes before the fix and Snakemake's log."""
    root = fresh_copy(broken_cohort, tmp_path_factory.mktemp("repaired") / "cohort")
    before = mtimes(root)
    shutil.copyfile(DATA / "cmu_small_region.svs", root / "slides" / f"{BROKEN}.svs")
    target = [
        f"results/{BROKEN}/lesions.csv", "results/cohort/metrics.json", "results/cohort/summary.tsv"
    ]  # fmt: skip
    proc = run_snakemake(root, "--cores", "2", *target)
    return root, before, proc.stderr


def test_rerun_one_failed_slide(repaired_cohort: tuple[Path, dict, str]):
    root, before, log = repaired_cohort
    assert job_stats(log) == Counter(
        {"tissue_mask": 1, "roi_grid": 1, "infer": 1, "stitch": 1, "detect": 1, "evaluate": 1,
         "summarise": 1}
    )  # fmt: skip
    for rel in ("lesions.csv", "score.json", "probmap.h5", "tiles.h5", "rois.h5", "tissue.png"):
        assert (root / "results" / BROKEN / rel).is_file()
    assert (root / "results" / "cohort" / "metrics.json").is_file()
    after = mtimes(root)
    others = {rel: t for rel, t in before.items() if not belongs_to(rel, BROKEN)}
    assert any(rel.startswith("results/t1/") for rel in others)
    changed = sorted(rel for rel, t in others.items() if after.get(rel) != t)
    assert not changed, f"files of other slides were rewritten: {changed}"
    # the cohort is now complete: nothing left to do
    proc = run_snakemake(root, "--cores", "2", "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_summary_lists_a_failed_slide_with_its_stage_and_cause(broken_cohort: Path, tmp_path: Path):
    """After the run in which slide ``bad`` failed, the summary lists the others and ``bad`` as
    failed in tissue_mask, with the cause of its failure record."""
    import pandas as pd

    root = fresh_copy(broken_cohort, tmp_path / "cohort")
    run_snakemake(root, "--cores", "1", "results/cohort/summary.tsv")
    table = pd.read_csv(root / "results" / "cohort" / "summary.tsv", sep="\t", dtype=str,
                        keep_default_na=False).set_index("slide_id")  # fmt: skip
    assert table["status"].to_dict() == {"t1": "ok", "n1": "ok", BROKEN: "failed"}
    assert table.loc[BROKEN, "failed_stage"] == "tissue_mask"
    assert BROKEN in table.loc[BROKEN, "failure_cause"]
    assert {table.loc[s, "call"] for s in ("t1", "n1")} <= {"positive", "negative"}
    assert "detected_lesions" in table.columns and "n_lesions" not in table.columns


def test_report_holds_the_summary_and_describes_the_workflow(
    repaired_cohort: tuple[Path, dict, str],
):
    """report.zip: the workflow description, the summary, metrics.json and slides.csv as items,
    and no internal path (the failure record) among the job parameters."""
    import zipfile

    root = repaired_cohort[0]
    metrics = (root / "results" / "cohort" / "metrics.json").read_text()
    assert '"operating_threshold"' in metrics
    run_snakemake(root, "--cores", "1", "--report", "report.zip")
    with zipfile.ZipFile(root / "report.zip") as zf:
        names = zf.namelist()
        text = "\n".join(
            zf.read(n).decode("utf-8", "replace")
            for n in names
            if n.endswith((".html", ".js", ".json", ".rst"))
        )
    for item in ("summary.tsv", "patients.tsv", "metrics.json", "slides.csv", "heatmap.png"):
        assert any(n.endswith(item) for n in names), item
    assert "the table to read first" in text  # workflow/report/workflow.rst
    assert "failure_record" not in text and "results_dir" not in text


def test_config_edit_reruns_the_stage_and_downstream_only(
    repaired_cohort: tuple[Path, dict, str], tmp_path: Path
):
    root = fresh_copy(repaired_cohort[0], tmp_path / "cohort")
    slides = ["t1", "n1", BROKEN]

    # detection threshold: detect of every slide + the evaluation
    before = mtimes(root)
    set_config(root, "detect", "threshold", 0.3)
    dry = run_snakemake(root, "--cores", "2", "--dry-run")
    assert "Params have changed" in dry.stdout + dry.stderr
    proc = run_snakemake(root, "--cores", "2")
    assert job_stats(proc.stderr) == Counter({"detect": 3, "evaluate": 1, "summarise": 1, "all": 1})
    after = mtimes(root)
    for sid in slides:
        for rel in ("lesions.csv", "score.json", "qc/heatmap.png", "probmap.tif"):
            assert after[f"results/{sid}/{rel}"] > before[f"results/{sid}/{rel}"]
        for rel in ("probmap.h5", "tiles.h5", "rois.h5", "tissue.png"):
            assert after[f"results/{sid}/{rel}"] == before[f"results/{sid}/{rel}"], rel
    assert after["results/cohort/metrics.json"] > before["results/cohort/metrics.json"]
    assert after["results/model/init.pt"] == before["results/model/init.pt"]
    upstream = [r for r in before if r.startswith("data/")]
    assert upstream and all(after[r] == before[r] for r in upstream)

    # stitch morphology: stitch, detect and evaluate; inference stays
    before = after
    set_config(root, "stitch", "closing_radius_um", 40.0)
    proc = run_snakemake(root, "--cores", "2")
    assert job_stats(proc.stderr) == Counter(
        {"stitch": 3, "detect": 3, "evaluate": 1, "summarise": 1, "all": 1}
    )
    after = mtimes(root)
    for sid in slides:
        assert after[f"results/{sid}/probmap.h5"] > before[f"results/{sid}/probmap.h5"]
        assert after[f"results/{sid}/lesions.csv"] > before[f"results/{sid}/lesions.csv"]
        for rel in ("tiles.h5", "rois.h5", "tissue.png"):
            assert after[f"results/{sid}/{rel}"] == before[f"results/{sid}/{rel}"], rel


def test_a_bad_checkpoint_fails_one_job_and_keeps_every_map(
    repaired_cohort: tuple[Path, dict, str], tmp_path: Path
):
    """After a complete run, model.checkpoint is set to a truncated copy of the model: the run
    fails in the one check_model job, no infer job starts, and every slide's tiles.h5 is kept
    untouched. Set back, the run has nothing to do (the first model's check record is kept)."""
    root = fresh_copy(repaired_cohort[0], tmp_path / "cohort")
    model = root / "results" / "model" / "init.pt"
    bad = root / "models" / "truncated.pt"
    bad.parent.mkdir()
    bad.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    before = mtimes(root)
    tiles = sorted(rel for rel in before if rel.endswith("/tiles.h5"))
    assert len(tiles) == 3
    set_config(root, "model", "checkpoint", "models/truncated.pt")
    proc = run_snakemake(root, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    assert re.findall(r"Error in rule (\w+)", proc.stderr) == ["check_model"], proc.stderr[-3000:]
    assert "rule infer" not in proc.stderr
    after = mtimes(root)
    assert all(after.get(rel) == before[rel] for rel in tiles), "a tiles.h5 was touched"
    assert "wsiscan: 1 more job(s) failed in this run" in proc.stderr
    assert "check_model check: model file models/truncated.pt: not a readable torch file" in (
        proc.stderr
    )
    set_config(root, "model", "checkpoint", None)
    dry = run_snakemake(root, "--cores", "2", "--dry-run")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
