"""Training throughput with and without prefetching loader workers (issue 6).

``train_throughput``: samples per second of :func:`wsiscan.train.train_round` on demo slides
(written by :func:`wsiscan.synth.synth_slide`, mask by the tissue stage, a few hundred patches by
:func:`wsiscan.patches.draw_patches`) with 0 loader workers (patches read and augmented in the
training process, between steps) against N worker processes that read ahead while the model
trains (the asynchronous prefetching of Fast ScanNet). Each variant trains 2 short epochs of
the demo model (width 1/8, batch 32); the figure is the second epoch's samples/s (persistent
workers already running), median over interleaved repeats. The cores are split as in the
infer benchmark: ``N = cpus // 2`` workers, torch threads = the rest, in both variants (so only
the prefetching differs; more threads than free cores makes OpenMP training several times
slower on a shared machine). On a CPU the speed-up is bounded by ``(read + step) / max(read,
step)`` and the training step dominates; the paper's > 10x needs a consumer (a GPU) far faster
than one reader, see ``gpu_train_throughput`` in :mod:`benchmarks.bench_gpu`.

``fp_per_round``: false positives per normal demo test slide after each training round (hard
negative mining between rounds should lower them). The trained round models come from a demo run:
``$WSISCAN_DEMO_DIR`` if set (e.g. the repository after ``make demo``), else a scratch run in the
benchmark cache that Snakemake brings up to date (the training rounds and the normal test slides'
ROI grids of the repository's default config: several minutes the first time, nothing after). Each
round's model then runs through the real stages (infer, stitch, detect with the config's settings)
on every normal test slide; every detection there is a false positive (Camelyon16). The smoke run
uses two untrained models on one small synthetic normal slide instead.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, cache_dir, figure, load_average, round_sig


def demo_slides(folder: Path, smoke: bool, synth_workers: int = 1) -> list[Any]:
    """One tumour and one normal demo slide with their tissue masks, cached in ``folder``.

    Returns :class:`wsiscan.patches.TrainSlide` records.
    """
    from wsiscan.params import SynthSlideParams, TissueMaskParams
    from wsiscan.patches import TrainSlide
    from wsiscan.synth import synth_slide
    from wsiscan.tissue import tissue_mask

    w, h = (2000, 1800) if smoke else (7000, 5000)
    slides = []
    for sid, label in (("bench_tumor", "tumor"), ("bench_normal", "normal")):
        stem = folder / f"{sid}_{w}x{h}"
        tif, xml, mask = (
            stem.with_suffix(".tif"),
            stem.with_suffix(".xml"),
            stem.with_name(stem.name + "_tissue.png"),
        )
        if not (tif.exists() and xml.exists()):
            params = SynthSlideParams(
                width_px=w, height_px=h, size_jitter=0.0, workers=synth_workers
            )
            synth_slide(tif, xml, params, slide_id=sid, label=label)
        if not mask.exists():
            qc = stem.with_name(stem.name + "_qc.png")
            tissue_mask(tif, mask, qc, TissueMaskParams(), slide_id=sid)
        slides.append(
            TrainSlide(
                slide_id=sid,
                path=str(tif),
                label=label,
                mask=str(mask),
                annotation=str(xml) if label == "tumor" else None,
            )
        )
    return slides


def measure_throughput(
    slides: list[Any],
    *,
    device: str,
    width: float,
    batch: int,
    per_epoch: int,
    workers: int,
    threads: int | None,
    amp: bool,
    repeats: int,
    n_samples: int,
) -> dict[str, Any]:
    """Train 2 epochs with 0 and with ``workers`` loader workers, ``repeats`` times interleaved;
    return figures (second-epoch samples/s, speed-up, share of time waiting for data) and runs.
    """
    import torch

    from wsiscan.params import TrainPatchesParams, TrainRoundParams
    from wsiscan.patches import draw_patches
    from wsiscan.train import train_round

    saved_threads = torch.get_num_threads()
    runs: dict[int, list[dict[str, Any]]] = {0: [], workers: []}
    try:
        with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
            tmp = Path(tmp_name)
            from wsiscan.formats.patches import write_patch_table

            table, _ = draw_patches(
                slides, TrainPatchesParams(n_patches=n_samples, val_fraction=0.0, seed=0)
            )
            write_patch_table(tmp / "patches.h5", table, {"kind": "patches", "Lf": 244, "Sf": 32})
            samples = {"n": len(table), "positives": int(table.label.sum())}
            for rep in range(repeats):
                for k in (0, workers):
                    params = TrainRoundParams(
                        width=width,
                        epochs=2,
                        patches_per_epoch=per_epoch,
                        batch_size=batch,
                        val_patches=0,
                        workers=k,
                        threads=threads or torch.get_num_threads(),
                        device=device,
                        amp=amp,
                        seed=rep,
                    )
                    out = tmp / f"w{k}_r{rep}"
                    metrics = train_round(
                        tmp / "patches.h5",
                        out / "model.pt",
                        out / "metrics.json",
                        out / "loss.png",
                        params,
                        round_index=1,
                    )
                    first, last = metrics["epochs"][0], metrics["epochs"][-1]
                    runs[k].append(
                        {
                            "epoch1_samples_per_s": first["samples_per_s"],
                            "epoch2_samples_per_s": last["samples_per_s"],
                            "epoch2_data_wait_s": last["data_wait_s"],
                            "epoch2_train_s": last["train_s"],
                        }
                    )
    finally:
        torch.set_num_threads(saved_threads)

    def med(k: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[k])

    sps0, spsn = med(0, "epoch2_samples_per_s"), med(workers, "epoch2_samples_per_s")
    wait0 = med(0, "epoch2_data_wait_s") / med(0, "epoch2_train_s")
    waitn = med(workers, "epoch2_data_wait_s") / med(workers, "epoch2_train_s")
    return {
        "figures": [
            figure("samples_per_s_0_workers", sps0, f"samples/s ({device})"),
            figure(f"samples_per_s_{workers}_workers", spsn, f"samples/s ({device})"),
            figure("prefetch_speedup", spsn / sps0, "x", "> 1"),
            figure("data_wait_share_0_workers", wait0, "of epoch time"),
            figure(f"data_wait_share_{workers}_workers", waitn, "of epoch time"),
        ],
        "config": {
            "width": width,
            "batch_size": batch,
            "samples_per_epoch": per_epoch,
            "epochs": 2,
            "torch_threads": threads,
            "workers": workers,
            "device": device,
            "amp": amp,
            "slides": [s.slide_id for s in slides],
            "samples": n_samples,
            "samples_summary": {k: v for k, v in samples.items() if not isinstance(v, dict | list)},
        },
        "runs": {
            str(k): [{kk: round_sig(vv) for kk, vv in r.items()} for r in v]
            for k, v in runs.items()
        },
    }


def bench_train_throughput(smoke: bool) -> dict[str, Any]:
    """Training samples/s with 0 vs N DataLoader workers (CPU, demo model width 1/8)."""
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, cpus // 2)
    folder = cache_dir(smoke) / "train"
    folder.mkdir(exist_ok=True)
    result = measure_throughput(
        demo_slides(folder, smoke),
        device="cpu",
        width=0.125,
        batch=4 if smoke else 32,
        per_epoch=8 if smoke else 256,
        workers=workers,
        threads=max(1, cpus - workers),  # the same in both variants: only the prefetching differs
        amp=False,
        repeats=1 if smoke else 3,
        n_samples=100 if smoke else 400,
    )
    result["load_average_after"] = load_average()
    return result


# -- fp_per_round --------------------------------------------------------------------------------
DEMO_DIR_ENV = "WSISCAN_DEMO_DIR"


def _read_config(workdir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())


def _normal_test_slides(workdir: Path, config: dict[str, Any]) -> list[tuple[str, Path]]:
    """``(slide_id, slide path)`` of the sheet's normal test slides."""
    sheet = workdir / config["samples"]
    with open(sheet, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [
        (r["slide_id"], workdir / r["path"])
        for r in rows
        if r["label"] == "normal" and r["split"] == "test"
    ]


def demo_run(workdir: Path, cores: int) -> tuple[dict[str, Any], list[Path]]:
    """Bring a demo run in ``workdir`` up to date for the round models and the normal test slides'
    ROI grids (Snakemake, the repository's workflow; ``config/`` copied from the repository when
    ``workdir`` has none). Returns ``(config, [round model paths])``."""
    if not (workdir / "config" / "config.yaml").exists():
        shutil.copytree(REPO / "config", workdir / "config", dirs_exist_ok=True)
    config = _read_config(workdir)
    rounds = int(config["train"]["rounds"])
    if rounds < 1 or config["model"].get("checkpoint"):
        raise RuntimeError(f"{workdir}: the config trains no rounds (train.rounds = {rounds})")
    models = [workdir / f"results/train/round{k}/model.pt" for k in range(1, rounds + 1)]
    targets = [str(m.relative_to(workdir)) for m in models] + [
        f"results/{sid}/rois.h5" for sid, _ in _normal_test_slides(workdir, config)
    ]
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        *targets,
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        str(cores),
        "--quiet",
        "rules",  # last: --quiet takes a list
    ]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"demo run in {workdir} failed:\n{proc.stderr[-3000:]}")
    return config, models


def false_positives(
    model: Path,
    slides: list[tuple[str, Path, Path]],
    config: dict[str, Any],
    out: Path,
    workers: int,
) -> dict[str, Any]:
    """Run ``model`` through infer, stitch and detect on normal slides ``(id, slide, rois.h5)``;
    every detection is a false positive. Returns detections per slide and map area above the
    detection threshold (mm^2 per slide)."""
    import h5py

    from wsiscan.config import validate_config
    from wsiscan.detect import detect
    from wsiscan.infer import infer
    from wsiscan.params import DetectParams, InferParams, StitchParams
    from wsiscan.stitch import stitch

    config = validate_config(dict(config))
    infer_params = InferParams.from_config(config, workers=workers, device="cpu")
    stitch_params, detect_params = (
        StitchParams.from_config(config),
        DetectParams.from_config(config),
    )
    det = config["detect"]
    counts, areas = [], []
    for sid, slide, rois in slides:
        d = out / sid
        infer(slide, rois, model, d / "tiles.h5", infer_params, slide_id=sid)
        # no QC picture: only the map counts here
        mask = rois.with_name("tissue.png")
        stitch(slide, d / "tiles.h5", mask, d / "probmap.h5", None, stitch_params, slide_id=sid)
        record = detect(
            d / "probmap.h5",
            d / "lesions.csv",
            d / "score.json",
            d / "regions.geojson",
            d / "regions.xml",
            detect_params,
            slide_id=sid,
        )
        counts.append(int(record["n_lesions"]))
        with h5py.File(d / "probmap.h5") as f:
            cell_mm2 = (float(f.attrs["stride_px"]) * float(f.attrs["mpp"]) / 1000) ** 2
            above = sum(
                int((f["prob"][r : r + 1024] >= float(det["threshold"])).sum())
                for r in range(0, f["prob"].shape[0], 1024)
            )
        areas.append(above * cell_mm2)
    return {
        "fp_per_slide": statistics.fmean(counts) if counts else 0.0,
        "fp_area_mm2_per_slide": statistics.fmean(areas) if areas else 0.0,
        "per_slide": {sid: c for (sid, _, _), c in zip(slides, counts, strict=True)},
    }


def bench_fp_per_round(smoke: bool) -> dict[str, Any]:
    """False positives per normal demo test slide after each training round."""
    from benchmarks.bench_pipeline import _mask_and_grid

    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="wsiscan-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if smoke:  # the harness on one small normal slide with two untrained "rounds"
            from wsiscan.model import init_model
            from wsiscan.params import InitModelParams

            (cache_dir(True) / "train").mkdir(parents=True, exist_ok=True)
            (slide,) = [
                s for s in demo_slides(cache_dir(True) / "train", True) if s.label == "normal"
            ]
            _mask_and_grid(Path(slide.path), tmp, n=4, alpha=2, slide_id=slide.slide_id)
            models = [tmp / f"round{k}.pt" for k in (1, 2)]
            for k, m in enumerate(models):
                init_model(m, InitModelParams(width=1 / 32, seed=k))
            config = _read_config(REPO)
            slides = [(slide.slide_id, Path(slide.path), tmp / "rois.h5")]
            source = "smoke: untrained models"
        else:
            workdir = Path(os.environ.get(DEMO_DIR_ENV) or cache_dir() / "demo")
            workdir.mkdir(parents=True, exist_ok=True)
            config, models = demo_run(workdir, cores=cpus)
            slides = [
                (sid, path, workdir / f"results/{sid}/rois.h5")
                for sid, path in _normal_test_slides(workdir, config)
            ]
            source = str(workdir)
        if not slides:
            raise RuntimeError("the sample sheet has no normal test slides")
        per_round = [
            false_positives(m, slides, config, tmp / f"round{k}", workers=max(1, cpus // 2))
            for k, m in enumerate(models, start=1)
        ]
    figures = []
    for k, r in enumerate(per_round, start=1):
        figures.append(figure(f"fp_per_normal_slide_round{k}", r["fp_per_slide"], "detections"))
    for k, r in enumerate(per_round, start=1):
        figures.append(
            figure(
                f"fp_area_round{k}", r["fp_area_mm2_per_slide"], "mm^2 per slide above threshold"
            )
        )
    figures.append(
        figure(
            "fp_change_last_vs_first_round",
            per_round[-1]["fp_per_slide"] - per_round[0]["fp_per_slide"],
            "detections per slide",
            "<= 0",
        )
    )
    return {
        "figures": figures,
        "demo_run": source,
        "normal_test_slides": [sid for sid, _, _ in slides],
        "detect": {k: config["detect"][k] for k in ("method", "threshold", "nms_radius_um")},
        "rounds": [{k: v for k, v in r.items()} for r in per_round],
        "load_average_after": load_average(),
    }


BENCHMARKS = {"train_throughput": bench_train_throughput, "fp_per_round": bench_fp_per_round}
