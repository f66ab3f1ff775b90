"""Model benchmarks (issue 4): FCN vs patch-by-patch, single pass vs shift-and-stitch, GPU.

* ``fcn_vs_patch``: the FCN on one ROI against the patch classifier on every ``Lf`` patch of it at
  stride ``Sf`` (identical outputs asserted). Slim width (1/8) on a small ROI, both sides run in
  full; full width on one paper ROI (2868 px, 6889 outputs) with the patch side estimated from a
  timed sample of batches (whose outputs are checked against the FCN's). Goal (full width, CPU):
  >= 30x; the operation-count ratio is ~35x.
* ``single_vs_shift``: single-pass dense tiles (anchor layers) against shift-and-stitch at
  alpha = 2 and 4 (identical tiles asserted). Goal (alpha = 2): >= 2.5x.
* ``gpu_model`` (CUDA; ``python -m benchmarks.run --gpu``): the full-width network's exactness on
  the GPU (float32 with TF32 off, and float64) and single pass vs shift-and-stitch on paper blocks
  (2884 px, alpha = 2) in float32, TF32 and bf16. The slide-level GPU run is ``gpu_slide``
  (benchmarks/bench_gpu.py).

Every pair runs in the same process, interleaved, median of repeats. Random weights with random
BatchNorm statistics (eval mode); inputs are random RGB normalised by :func:`wsiscan.model.to_tensor`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import figure, interleaved_medians, load_average, one_core, round_sig
from wsiscan.dense import patch_classifier, shift_and_stitch, single_pass
from wsiscan.model import ScanNet, to_tensor

FCN_GOAL = 30.0
SINGLE_PASS_GOAL = 2.5


# -- helpers -------------------------------------------------------------------------------------
def random_model(
    width: float, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> ScanNet:
    """ScanNet with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ScanNet(width=width)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.to(device=device, dtype=dtype).eval()


def random_blocks(batch: int, side: int, *, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    rgb = np.random.default_rng(seed).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    return to_tensor(rgb, device=device)


def conv_macs(model: ScanNet, side: int, alpha: int = 1) -> int:
    """Multiply-accumulates of every convolution for a square input (single pass at ``alpha``)."""
    macs = 0
    for spec, mods, (stride, dilation) in zip(
        model.layers, model._mods, model.dense_plan(alpha), strict=True
    ):
        side = (side - dilation * (spec.kernel - 1) - 1) // stride + 1
        if mods is not None:
            conv = mods[0]
            macs += side * side * spec.kernel**2 * conv.in_channels * conv.out_channels
    return macs


def rel_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- fcn_vs_patch --------------------------------------------------------------------------------
def fcn_vs_patch(
    width: float,
    n: int,
    *,
    sample_batches: int | None = None,
    batch_size: int = 16,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """FCN on one ``Lf + n*Sf`` ROI vs the patch classifier on its ``(n+1)^2`` patches.

    ``sample_batches=None`` runs every patch (both sides timed, median of ``repeats``); otherwise
    the FCN runs once untimed and ``repeats`` times timed, and ``sample_batches`` batches of
    ``batch_size`` random patches are timed (the first one discarded as warm-up) and scaled up to
    all ``(n+1)^2`` patches, their outputs checked against the FCN's cells.
    """
    model = random_model(width, device=device, seed=seed)
    geo = model.geometry(n)
    roi = random_blocks(1, geo.Lr, seed=seed, device=device)
    outputs = geo.Lp**2

    def fcn():
        with torch.inference_mode():
            out = model(roi)
        _sync(device)
        return out

    if sample_batches is None:
        medians, all_s, results = interleaved_medians(
            {
                "fcn": fcn,
                "patch": lambda: patch_classifier(
                    model, roi, geo.Sf, output="logits", batch_size=batch_size
                ),
            },
            repeats=repeats,
        )
        fcn_s, patch_s = medians["fcn"], medians["patch"]
        diff = rel_diff(results["fcn"], results["patch"])
        estimated, times = False, all_s
    else:
        fcn()  # warm-up, as the patch side's first batch: the heap grows to the ROI's activations
        fcn_s_list = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fcn_out = fcn()
            fcn_s_list.append(time.perf_counter() - t0)
        fcn_s = float(np.median(fcn_s_list))
        rng = np.random.default_rng(seed)
        cells = rng.integers(0, geo.Lp, (sample_batches * batch_size, 2))
        per_patch, diffs = [], []
        fcn_cpu = fcn_out.cpu()
        lf = geo.Lf
        for b in range(sample_batches):
            chunk = cells[b * batch_size : (b + 1) * batch_size]
            patches = torch.stack(
                [
                    roi[0, :, r * geo.Sf : r * geo.Sf + lf, c * geo.Sf : c * geo.Sf + lf]
                    for r, c in chunk
                ]
            )
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model(patches)
            _sync(device)
            per_patch.append((time.perf_counter() - t0) / len(chunk))
            ref = torch.stack([fcn_cpu[0, :, r, c] for r, c in chunk])
            diffs.append(rel_diff(out[:, :, 0, 0], ref))
        patch_s = float(np.median(per_patch[1:] if len(per_patch) > 1 else per_patch)) * outputs
        diff = max(diffs)
        estimated = True
        times = {"fcn": [round(t, 4) for t in fcn_s_list], "patch_per_patch": per_patch}
    if diff > 1e-4:
        raise AssertionError(f"FCN and patch classifier differ: relative {diff:.3g}")
    return {
        "width": width,
        "n": n,
        "roi_px": geo.Lr,
        "outputs": outputs,
        "fcn_s": round_sig(fcn_s),
        "patch_s": round_sig(patch_s),
        "patch_estimated_from_sample": estimated,
        "speedup": round_sig(patch_s / fcn_s),
        "op_ratio": round_sig(outputs * conv_macs(model, geo.Lf) / conv_macs(model, geo.Lr)),
        "max_rel_diff": diff,
        "times_s": times,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }


def bench_fcn_vs_patch(smoke: bool) -> dict[str, Any]:
    """Slim small ROI fully (both sides), then full width on one paper ROI (patch side sampled).

    Pinned to one core with one torch thread: both sides get the same compute whatever else the
    machine runs (with two threads on a shared 2-core VM the ratio drifted with the load).
    """
    with one_core():
        slim = fcn_vs_patch(1 / 8, 2 if smoke else 20, repeats=1 if smoke else 3)
        full = fcn_vs_patch(
            1 / 16 if smoke else 1.0,
            1 if smoke else 82,
            sample_batches=2 if smoke else 6,
            batch_size=2 if smoke else 8,
            repeats=1 if smoke else 2,
        )
    return {
        "figures": [
            figure(
                "full_width_speedup",
                full["speedup"],
                "x (1 CPU core, patch side sampled)",
                f">= {FCN_GOAL:g}",
            ),
            figure("full_width_op_ratio", full["op_ratio"], "x (conv MACs)"),
            figure("full_width_fcn_s", full["fcn_s"], f"s ({full['roi_px']} px ROI)"),
            figure("full_width_patch_s_est", full["patch_s"], f"s ({full['outputs']} patches)"),
            figure("slim_speedup", slim["speedup"], "x (width 1/8, both sides run)"),
            figure("slim_op_ratio", slim["op_ratio"], "x (conv MACs)"),
        ],
        "slim": slim,
        "full_width": full,
        "load_average_after": load_average(),
    }


# -- single_vs_shift -----------------------------------------------------------------------------
def single_vs_shift(
    width: float, n: int, alpha: int, *, batch: int = 1, repeats: int = 3, device: str = "cpu"
) -> dict[str, Any]:
    """Single-pass dense tiles vs shift-and-stitch on ``batch`` blocks (identical tiles asserted)."""
    model = random_model(width, device=device)
    geo = model.geometry(n, alpha)
    blocks = random_blocks(batch, geo.block_side, device=device)

    def run(fn):
        def go():
            out = fn(model, blocks, alpha, output="logits")
            _sync(device)
            return out

        return go

    medians, all_s, results = interleaved_medians(
        {"single": run(single_pass), "shift": run(shift_and_stitch)}, repeats=repeats, warmup=1
    )
    diff = rel_diff(results["single"], results["shift"])
    if diff > 1e-4:
        raise AssertionError(f"single pass and shift-and-stitch differ: relative {diff:.3g}")
    shift_macs = alpha**2 * conv_macs(model, geo.Lr)
    return {
        "width": width,
        "n": n,
        "alpha": alpha,
        "block_px": geo.block_side,
        "tile_side": geo.tile_side,
        "batch": batch,
        "single_s": round_sig(medians["single"]),
        "shift_s": round_sig(medians["shift"]),
        "speedup": round_sig(medians["shift"] / medians["single"]),
        "op_ratio": round_sig(shift_macs / conv_macs(model, geo.block_side, alpha)),
        "max_rel_diff": diff,
        "times_s": all_s,
        "device": device,
    }


def bench_single_vs_shift(smoke: bool) -> dict[str, Any]:
    """Width 1/4 at n = 40 (a 1524 px ROI) for alpha 2 and 4; full width at n = 10 for alpha 2."""
    reps = 1 if smoke else 3
    w, n = (1 / 16, 2) if smoke else (1 / 4, 40)
    a2 = single_vs_shift(w, n, 2, repeats=reps)
    a4 = single_vs_shift(w, n, 4, repeats=reps)
    full = single_vs_shift(1 / 16 if smoke else 1.0, 1 if smoke else 10, 2, repeats=reps)
    return {
        "figures": [
            figure(
                "alpha2_speedup",
                a2["speedup"],
                f"x (width {w:g}, n {n})",
                f">= {SINGLE_PASS_GOAL:g}",
            ),
            figure("alpha2_op_ratio", a2["op_ratio"], "x (conv MACs)"),
            figure("alpha4_speedup", a4["speedup"], f"x (width {w:g}, n {n})"),
            figure("alpha4_op_ratio", a4["op_ratio"], "x (conv MACs)"),
            figure(
                "full_width_alpha2_speedup",
                full["speedup"],
                f"x (width {full['width']:g}, n {full['n']})",
            ),
        ],
        "alpha2": a2,
        "alpha4": a4,
        "full_width_alpha2": full,
        "load_average_after": load_average(),
    }


# -- gpu_model -----------------------------------------------------------------------------------
SMOKE_ENV = "WSISCAN_GPU_BENCH_SMOKE"  # the switch benchmarks/bench_gpu.py uses too


def _gpu_exactness(device: str, smoke: bool) -> dict[str, Any]:
    """Full width (n = 1), TF32 off: single == shift == patch classifier in float32 and float64."""
    from wsiscan.infer import exact_cuda_math

    out: dict[str, Any] = {}
    with exact_cuda_math(device == "cuda"):
        for dtype in (torch.float32, torch.float64):
            model = random_model(1 / 32 if smoke else 1.0, dtype=dtype, device=device, seed=3)
            with torch.no_grad():
                model.head.fc8.weight.mul_(50.0)  # logits of a meaningful size
            for alpha in (2,) if smoke else (2, 4):
                geo = model.geometry(1, alpha)
                block = random_blocks(2, geo.block_side, seed=alpha, device=device).to(dtype)
                single = single_pass(model, block, alpha, output="logits")
                shift = shift_and_stitch(model, block, alpha, output="logits")
                ref = patch_classifier(model, block, geo.Sd, output="logits", batch_size=64)
                out[f"{str(dtype).split('.')[-1]}_alpha{alpha}"] = {
                    "single_vs_shift": rel_diff(single, shift),
                    "shift_vs_patch": rel_diff(shift, ref),
                    "single_vs_patch": rel_diff(single, ref),
                }
    return out


def _precision(device: str, mode: str):
    """Context for ``fp32`` (exact: TF32 off), ``tf32`` or ``bf16`` (autocast) on ``device``."""
    import contextlib

    from wsiscan.infer import exact_cuda_math

    stack = contextlib.ExitStack()
    if device != "cuda":
        return stack
    stack.enter_context(exact_cuda_math(True))
    if mode == "tf32":
        torch.backends.cudnn.allow_tf32 = True  # restored by exact_cuda_math on exit
        torch.backends.cuda.matmul.allow_tf32 = True
    elif mode == "bf16":
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    return stack


def _gpu_block_speed(device: str, smoke: bool) -> dict[str, Any]:
    """Full-width paper blocks (n = 82, alpha = 2): single pass vs shift-and-stitch per block in
    float32 (exact), TF32 and bf16, batches of 1 and 4."""
    n, width = (1, 1 / 32) if smoke else (82, 1.0)
    model = random_model(width, device=device)
    geo = model.geometry(n, 2)
    result: dict[str, Any] = {"n": n, "width": width, "block_px": geo.block_side}
    modes = ("fp32",) if device != "cuda" else ("fp32", "tf32", "bf16")
    for batch in (1,) if smoke else (1, 4):
        blocks = random_blocks(batch, geo.block_side, device=device)
        for mode in modes:

            def run(fn, mode=mode, blocks=blocks):
                def go():
                    with _precision(device, mode):
                        out = fn(model, blocks, 2)
                    _sync(device)
                    return out

                return go

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            medians, all_s, res = interleaved_medians(
                {"single": run(single_pass), "shift": run(shift_and_stitch)},
                repeats=1 if smoke else 4,
                warmup=1,
            )
            result[f"batch{batch}_{mode}"] = {
                "single_s_per_block": round_sig(medians["single"] / batch),
                "shift_s_per_block": round_sig(medians["shift"] / batch),
                "speedup": round_sig(medians["shift"] / medians["single"]),
                "single_vs_shift_prob_max_abs": float(
                    (res["single"].float() - res["shift"].float()).abs().max()
                ),
                "peak_gib": round_sig(torch.cuda.max_memory_allocated() / 2**30)
                if device == "cuda"
                else None,
                "times_s": all_s,
            }
    return result


def bench_gpu_model(smoke: bool) -> dict[str, Any]:
    """GPU: the full-width network's exactness (float32/float64, TF32 off) and the speed of single
    pass vs shift-and-stitch on paper blocks in float32, TF32 and bf16.

    The slide-level GPU run is ``gpu_slide`` in benchmarks/bench_gpu.py. With
    ``WSISCAN_GPU_BENCH_SMOKE=1`` (or ``smoke``) and no GPU it runs tiny inputs on the CPU.
    """
    smoke = smoke or os.environ.get(SMOKE_ENV, "") not in ("", "0")
    if torch.cuda.is_available():
        device = "cuda"
    elif smoke:
        device = "cpu"
    else:
        raise RuntimeError(f"gpu_model needs CUDA (set {SMOKE_ENV}=1 for a dry run on the CPU)")
    t0 = time.perf_counter()
    exact = _gpu_exactness(device, smoke)
    speed = _gpu_block_speed(device, smoke)
    fp32_rel = max(v["single_vs_patch"] for k, v in exact.items() if k.startswith("float32"))
    fp64_rel = max(v["single_vs_patch"] for k, v in exact.items() if k.startswith("float64"))
    figures = [
        # float32 rounding of a 16-layer net with K up to 4608-term sums (H100: 1.0e-5); float64
        # shows the algebraic exactness (6e-15)
        figure("fp32_full_width_single_vs_patch_rel", fp32_rel, "relative", "<= 1e-4"),
        figure("fp64_full_width_single_vs_patch_rel", fp64_rel, "relative", "<= 1e-10"),
    ]
    batch = 1 if smoke else 4
    for mode in ("fp32", "tf32", "bf16"):
        b4 = speed.get(f"batch{batch}_{mode}")
        if b4 is None:
            continue
        unit = f"s ({speed['block_px']} px block, batch {batch})"
        figures += [
            figure(f"{mode}_single_s_per_block", b4["single_s_per_block"], unit),
            figure(f"{mode}_shift_s_per_block", b4["shift_s_per_block"], unit),
            figure(
                f"{mode}_single_vs_shift_speedup",
                b4["speedup"],
                "x",
                f">= {SINGLE_PASS_GOAL:g}" if mode == "fp32" else None,
            ),
        ]
    return {
        "figures": figures,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "exactness": exact,
        "block_speed": speed,
        "seconds": round(time.perf_counter() - t0, 1),
    }


BENCHMARKS = {
    "fcn_vs_patch": bench_fcn_vs_patch,
    "single_vs_shift": bench_single_vs_shift,
    "gpu_model": bench_gpu_model,
}
