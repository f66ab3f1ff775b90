"""DAG scale: how long Snakemake needs to build the workflow's DAG for a large cohort (dry run).

A generated sample sheet of ``n_slides`` slides with placeholder files (empty files at real paths:
a dry run never opens them) is dry-run with the repository's workflow, pinned to one CPU core,
once plainly and once through the SLURM profile (which adds the per-slide job groups). The figure is
the wall time of the whole ``snakemake -n`` process: start-up, parsing, config and sheet validation,
DAG and job statistics, so it bounds the DAG build time from above.

    python -m benchmarks.bench_dag                 # 1000 slides (issue 7: <= 20 s on one core)
    python -m benchmarks.bench_dag --slides 200 --train 50 --rounds 2
    python -m benchmarks.run --only dag            # through the benchmark runner
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_PROFILE = REPO / "profiles" / "slurm"
BIN = Path(sys.executable).parent
GOAL_S = 20.0
HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"


def make_cohort(root: Path, n_slides: int, n_train: int = 0, rounds: int = 0) -> Path:
    """Write ``root/config/{config.yaml,slides.tsv}`` for ``n_slides`` test slides (half tumour,
    with placeholder ASAP XML) plus ``n_train`` training slides, and the placeholder files.

    The config is the repository's default with ``train.rounds = rounds``. Returns ``root``.
    """
    slides = root / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    (root / "config").mkdir(exist_ok=True)
    rows = []
    for i in range(n_slides + n_train):
        split = "test" if i < n_slides else "train"
        sid = f"{split}_{i:05d}"
        tumour = i % 2 == 0
        path = slides / f"{sid}.svs"
        path.touch()
        annotation = ""
        if tumour:
            annotation = f"slides/{sid}.xml"
            (root / annotation).touch()
        label = "tumor" if tumour else "normal"
        rows.append(f"{sid}\tslides/{sid}.svs\t{annotation}\t{label}\t{split}\n")
    (root / "config" / "slides.tsv").write_text(HEADER + "".join(rows))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["samples"] = "config/slides.tsv"
    config.setdefault("train", {})["rounds"] = rounds
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def _pin_to_one_core() -> None:
    """Child-process hook: run on the first CPU this process may use."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def dry_run_seconds(workdir: Path, *extra: str, timeout: float = 600) -> tuple[float, float, int]:
    """``snakemake -n`` in ``workdir`` pinned to one CPU core: (wall seconds, CPU seconds, jobs).

    CPU seconds (user + system of the Snakemake process) equal the wall time on an otherwise idle
    core and do not grow when other processes compete for it.
    """
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--dry-run",
        "--cores",
        "1",
        "--quiet",
        "rules",
        *extra,
    ]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_pin_to_one_core,  # this process runs no threads
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    match = re.search(r"^total\s+(\d+)\s*$", proc.stdout + proc.stderr, re.M)
    if match is None:
        raise RuntimeError(f"no job count in the dry-run output:\n{proc.stdout}\n{proc.stderr}")
    return wall, cpu, int(match.group(1))


def bench_dag(
    smoke: bool = False, n_slides: int = 1000, n_train: int = 0, rounds: int = 0, repeats: int = 3
) -> dict:
    """Dry-run DAG build time for ``n_slides`` slides (20 with ``smoke``), plain and with the SLURM
    profile, on one core; medians of ``repeats`` runs. Returns the runner's result dict: ``figures``
    (CPU seconds of the dry run, goal <= 20 s; wall seconds beside them) and details."""
    if smoke:
        n_slides, n_train, repeats = 20, min(n_train, 4), 1
    total = n_slides + n_train
    runs = {"plain": (), "slurm_profile": ("--profile", str(SLURM_PROFILE))}
    details: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="wsiscan-dag-") as tmp:
        workdir = make_cohort(Path(tmp), n_slides, n_train, rounds)
        for name, extra in runs.items():
            samples = [dry_run_seconds(workdir, *extra) for _ in range(max(1, repeats))]
            details[name] = {
                "wall_s": round(statistics.median(w for w, _, _ in samples), 2),
                "cpu_s": round(statistics.median(c for _, c, _ in samples), 2),
                "jobs": samples[0][2],
                "repeats": len(samples),
            }
    figures = []
    for name, label in (("plain", ""), ("slurm_profile", " with profiles/slurm")):
        d = details[name]
        figures.append(
            {
                "name": f"dry-run DAG{label}, {total} slides ({d['jobs']} jobs), 1 core, CPU time",
                "value": d["cpu_s"],
                "unit": "s",
                "goal": f"<= {GOAL_S:g}",
                "met": d["cpu_s"] <= GOAL_S,
            }
        )
        figures.append(
            {
                "name": f"dry-run DAG{label}, {total} slides, 1 core, wall time",
                "value": d["wall_s"],
                "unit": "s",
            }
        )
    return {
        "figures": figures,
        "n_slides": n_slides,
        "n_train": n_train,
        "train_rounds": rounds,
        **details,
        "command": "snakemake --dry-run --cores 1 --quiet rules [--profile profiles/slurm]"
        " pinned to one core",
    }


BENCHMARKS = {"dag": bench_dag}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dag", description=__doc__.split("\n")[0]
    )
    p.add_argument("--slides", type=int, default=1000, help="test-split slides (default 1000)")
    p.add_argument("--train", type=int, default=0, help="training slides (default 0)")
    p.add_argument("--rounds", type=int, default=0, help="train.rounds (default 0: init_model)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    p.add_argument("--smoke", action="store_true", help="20 slides, one run")
    args = p.parse_args(argv)
    result = bench_dag(args.smoke, args.slides, args.train, args.rounds, args.repeats)
    print(json.dumps(result, indent=2))
    return 0 if all(f.get("met", True) for f in result["figures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
