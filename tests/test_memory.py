"""The memory requests of the torch stages (wsiscan.memory): monotone in what drives them,
bounded, above the peaks measured by benchmarks/bench_scale.py, and what the rules ask for.

A small measured case runs in the benchmarks' smoke test (tests/test_benchmarks.py: the smoke
``infer_rss`` must find its request above the peak it measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsiscan import dag
from wsiscan.memory import BASE_MB, MARGIN, infer_memory_mb, train_memory_mb

REPO = Path(__file__).resolve().parents[1]
LATEST = REPO / "benchmarks" / "results" / "latest.json"

PAPER = dict(block_side_px=2884, tile_side_px=166, width=1.0, batch_size=4, workers=2)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "key, larger",
    [
        ("block_side_px", 3876),
        ("tile_side_px", 400),
        ("width", 2.0),
        ("batch_size", 8),
        ("workers", 8),
    ],
)
def test_infer_request_grows_with_each_input(key: str, larger: float, device: str):
    small = {**PAPER, "width": 0.125}
    base = infer_memory_mb(**small, device=device)
    more = infer_memory_mb(**{**small, key: larger}, device=device)
    assert more >= base, key
    if device == "cpu" and key in ("block_side_px", "width", "batch_size", "workers"):
        assert more > base, key  # these drive the host's peak on a CPU


def test_infer_request_bounds_and_dtype():
    smallest = infer_memory_mb(block_side_px=1, tile_side_px=1, width=1e-3, batch_size=1, workers=0)
    assert BASE_MB * MARGIN <= smallest <= BASE_MB * MARGIN + 100
    gpu = infer_memory_mb(**PAPER, device="cuda")
    assert 4000 <= gpu <= 16000  # the host side of a GPU job: context and loader, no activations
    cpu32 = infer_memory_mb(**PAPER, device="cpu")
    cpu16 = infer_memory_mb(**PAPER, device="cpu", dtype="bfloat16")
    assert cpu16 < cpu32 <= 64000  # full width on a CPU: ~26 GB of activations per batch of 4
    assert infer_memory_mb(**PAPER, dense_mode="shift") == infer_memory_mb(**PAPER)
    assert infer_memory_mb(**PAPER, device="cuda", dtype="bfloat16") == gpu
    with pytest.raises(ValueError, match="dtype"):
        infer_memory_mb(**PAPER, dtype="int8")
    with pytest.raises(ValueError, match="width"):
        infer_memory_mb(**{**PAPER, "width": 0})
    with pytest.raises(ValueError, match="dense_mode"):
        infer_memory_mb(**PAPER, dense_mode="patch")


def test_train_request_grows_and_is_bounded():
    args = dict(patch_side_px=244, width=0.125, batch_size=32, workers=2, prefetch_factor=4)
    base = train_memory_mb(**args)
    for key, larger in [("width", 1.0), ("batch_size", 64), ("workers", 8), ("patch_side_px", 500)]:
        assert train_memory_mb(**{**args, key: larger}) > base, key
    assert BASE_MB * MARGIN <= base <= 4000
    assert train_memory_mb(**{**args, "width": 1.0}, device="cuda") < 8000


def test_request_lies_above_the_measured_peaks():
    """Every peak of ``benchmarks.run --only infer_rss`` (stored in latest.json) is below what
    the function asks for the same geometry, width, batch and loader."""
    latest = json.loads(LATEST.read_text())
    peaks = latest["benchmarks"]["infer_rss"]["result"]["measured_peaks"]
    assert len({p["blocks"] for p in peaks}) >= 3
    for peak in peaks:
        args = {k: peak[k] for k in ("block_side_px", "tile_side_px", "width", "batch_size")}
        request = infer_memory_mb(
            **args,
            workers=peak["workers"],
            dtype=peak["dtype"],
            dense_mode=peak["dense_mode"],
            device=peak["device"],
        )
        assert peak["peak_rss_mb"] < request, peak
        assert request < 2 * peak["peak_rss_mb"] + 1000, peak  # not wildly above either


def test_rules_ask_for_the_request_times_the_attempt():
    """What the workflow's rules use (dag.memory_request_mb) for the demo config, per stage."""
    import yaml

    from wsiscan.config import validate_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config = validate_config(config) or config
    for stage in ("infer", "mine_negatives", "train_round"):
        mb = dag.memory_request_mb(config, stage)
        assert BASE_MB * MARGIN <= mb <= 16000, stage
    config["infer"]["device"] = "cpu"
    cpu = dag.memory_request_mb(config, "infer")
    config["infer"]["batch_size"] *= 4
    assert dag.memory_request_mb(config, "infer") > cpu
    with pytest.raises(ValueError, match="no memory model"):
        dag.memory_request_mb(config, "stitch")
