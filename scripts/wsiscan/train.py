"""Training (stage ``train_round``): the prefetching patch trainer.

The patch tables are :mod:`wsiscan.formats.patches` (drawn by :mod:`wsiscan.patches`, mined by
:mod:`wsiscan.mining`); the settings are :class:`wsiscan.params.TrainRoundParams`.

A :class:`torch.utils.data.DataLoader` whose worker processes (the producers) open the slides
lazily and read ``Lf x Lf`` level-0 patches centred on the samples (patch top-left = centre -
``Lf // 2``, the same patch the dense map scores for a cell centre), normalise their stain to the
training cohort's reference when ``stain.normalisation`` asks for it (:mod:`wsiscan.stain`; the
reference goes into ``model.pt``), augment them (flips, 90-degree rotations, HED stain
augmentation, optional colour jitter) and hand uint8 batches (pinned on CUDA) to the main process
(the consumer), which normalises them with :func:`wsiscan.model.to_tensor` and trains. Mixed
precision on CUDA. Validation by slide. A checkpoint (model, optimizer, scaler, epoch, RNG state,
history) is written atomically after each epoch and a re-run resumes from it when it belongs to
the same training set-up.

Augmentation is seeded per sample from ``(seed, round, epoch, sample index)``, so results do not
depend on the number of loader workers or on resuming.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .fileio import atomic_write, sha256_file, sha256_json, write_json
from .formats.patches import (
    LABEL_NORMAL,
    LABEL_TUMOUR,
    PatchTable,
    merge_tables,
    read_patch_table,
)
from .geometry import ARCHITECTURES, receptive_field
from .params import TrainRoundParams, result_fields
from .patches import stable_rng
from .slide import Slide, open_slide

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "wsiscan-train-state/1"
#: ITU-R BT.601 luma weights (grey for contrast and saturation jitter).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


# == augmentation ==================================================================================
def colour_matrix(
    rgb_mean: np.ndarray, brightness: float, contrast: float, saturation: float, hue_turn: float
) -> tuple[np.ndarray, np.ndarray]:
    """Affine colour map ``x -> M @ x + t`` (RGB in [0, 1]) for the given jitter factors.

    Applied in order: brightness (scale), contrast (towards the patch's mean grey), saturation
    (towards each pixel's grey), hue (rotation of the chroma plane in YIQ).
    """
    m = np.eye(3) * brightness
    t = np.zeros(3)
    grey_mean = float(LUMA @ (np.asarray(rgb_mean, np.float64) * brightness))
    m, t = contrast * m, contrast * t + (1.0 - contrast) * grey_mean
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), LUMA)
    m, t = sat @ m, sat @ t
    a = 2.0 * math.pi * hue_turn
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    hue = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    return hue @ m, hue @ t


def augment_patch(
    rgb: np.ndarray, rng: np.random.Generator, params: TrainRoundParams
) -> np.ndarray:
    """Randomly flipped / rotated / stain-perturbed / colour-jittered copy of an RGB uint8 patch
    (H, W, 3).

    The HED perturbation (:func:`wsiscan.stain.hed_perturb`, strengths ``hed_scale`` and
    ``hed_shift``) comes before the colour jitter; its six draws follow the jitter's, so the
    flips, rotations and jitter of a sample are those it had without it.
    """
    from .stain import draw_hed, hed_perturb

    out = rgb
    if params.flips and rng.random() < 0.5:
        out = out[:, ::-1]
    if params.rotate90:
        out = np.rot90(out, int(rng.integers(4)))
    factors = (
        1.0 + rng.uniform(-params.brightness, params.brightness),
        1.0 + rng.uniform(-params.contrast, params.contrast),
        1.0 + rng.uniform(-params.saturation, params.saturation),
        rng.uniform(-params.hue, params.hue),
    )
    alpha, beta = draw_hed(rng, params.hed_scale, params.hed_shift)
    if params.hed_scale > 0 or params.hed_shift > 0:
        out = hed_perturb(out, alpha, beta)
    if factors != (1.0, 1.0, 1.0, 0.0):
        x = out.reshape(-1, 3).astype(np.float32) * np.float32(1 / 255)
        m, t = colour_matrix(x.mean(axis=0), *factors)
        x = x @ m.T.astype(np.float32) + t.astype(np.float32)
        out = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(out.shape)
    return np.ascontiguousarray(out)


# == data loading ==================================================================================
class PatchDataset(torch.utils.data.Dataset):
    """``Lf x Lf`` level-0 patches centred on sample centres, read lazily from the slides.

    Keys are ``(sample index, epoch)``; epoch ``-1`` reads without augmentation (validation).
    Each worker process opens the slides it needs on first use and keeps them open.
    ``stain_maps`` (one per slide of the table, None for none) normalise every patch of a slide,
    augmented or not. Returns ``(uint8 tensor (Lf, Lf, 3), label int64)``.
    """

    def __init__(
        self,
        table: PatchTable,
        patch_px: int,
        augment: TrainRoundParams,
        seed: int,
        round_index: int,
        stain_maps: Sequence[Any] | None = None,
    ) -> None:
        self.slide_path = list(table.slide_path)
        self.slide_id = list(table.slide_id)
        self.level0_xy = np.ascontiguousarray(table.level0_xy, dtype=np.int64)
        self.label = np.ascontiguousarray(table.label, dtype=np.int64)
        self.slide_index = np.ascontiguousarray(table.slide_index, dtype=np.int32)
        self.patch_px = int(patch_px)
        self.augment = augment
        self.seed = int(seed)
        self.round_index = int(round_index)
        self.stain_maps = list(stain_maps) if stain_maps is not None else None
        self._slides: dict[int, Slide] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slides"] = {}  # open handles stay in the process that opened them
        return state

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def _slide(self, i: int) -> Slide:
        slide = self._slides.get(i)
        if slide is None:
            slide = open_slide(self.slide_path[i], self.slide_id[i])
            self._slides[i] = slide
        return slide

    def read(self, index: int) -> np.ndarray:
        """The patch of sample ``index`` (RGB uint8, ``Lf x Lf``), stain-normalised when the
        dataset has a map for its slide."""
        cx, cy = self.level0_xy[index]
        half = self.patch_px // 2
        i = int(self.slide_index[index])
        rgb = self._slide(i).read_rgb((int(cx) - half, int(cy) - half), 0, (self.patch_px,) * 2)
        stain_map = self.stain_maps[i] if self.stain_maps is not None else None
        return stain_map(rgb) if stain_map is not None else rgb

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        index, epoch = (int(key), -1) if isinstance(key, int | np.integer) else map(int, key)
        rgb = self.read(index)
        if epoch >= 0:
            rng = stable_rng(self.seed, self.round_index, epoch, index)
            rgb = augment_patch(rgb, rng, self.augment)
        return torch.from_numpy(rgb), int(self.label[index])

    def close(self) -> None:
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()


def compose_epoch(
    positives: np.ndarray,
    negatives: np.ndarray,
    hard: np.ndarray,
    n: int,
    positive_fraction: float,
    hard_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sample indices of one epoch: ``n`` of them, ``positive_fraction`` positives, and of the
    negatives a ``hard_fraction`` share of the epoch drawn from the hard negatives (as many as
    there are), shuffled. Each pool is drawn without replacement while it lasts."""

    def take(pool: np.ndarray, k: int) -> np.ndarray:
        if k <= 0 or len(pool) == 0:
            return pool[:0]
        reps = -(-k // len(pool))
        return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:k]

    n_pos = int(round(n * positive_fraction)) if len(negatives) + len(hard) else n
    n_pos = n_pos if len(positives) else 0
    n_hard = min(int(round(n * hard_fraction)), len(hard), n - n_pos)
    n_neg = n - n_pos - n_hard
    if len(negatives) == 0:
        n_hard, n_neg = n - n_pos, 0
    keys = np.concatenate([take(positives, n_pos), take(negatives, n_neg), take(hard, n_hard)])
    return rng.permutation(keys)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(sample index, epoch)`` keys of one epoch (see :func:`compose_epoch`).

    The epoch's composition depends only on ``(seed, round, epoch)``; call :meth:`set_epoch`
    before iterating (works with persistent workers: the sampler runs in the main process).
    """

    def __init__(
        self,
        positives: np.ndarray,
        negatives: np.ndarray,
        hard: np.ndarray,
        n: int,
        positive_fraction: float,
        hard_fraction: float,
        seed: int,
        round_index: int,
    ) -> None:
        self.pools = (positives, negatives, hard)
        self.n = int(n)
        self.positive_fraction = positive_fraction
        self.hard_fraction = hard_fraction
        self.seed = seed
        self.round_index = round_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        rng = stable_rng(self.seed, self.round_index, self.epoch, "epoch")
        return compose_epoch(*self.pools, self.n, self.positive_fraction, self.hard_fraction, rng)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices():
            yield int(i), self.epoch

    def __len__(self) -> int:
        return self.n


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    dataset: PatchDataset,
    sampler: Any,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    prefetch_factor: int = 4,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """DataLoader with ``workers`` producer processes (persistent, prefetching) or in-process."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(
            persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **kwargs,
    )


# == trainer =======================================================================================
def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5% of ``base_lr`` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _atomic_torch_save(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            log.warning("CUDA RNG state of the checkpoint does not fit this machine; not restored")


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """The resumable training state at ``path`` (``weights_only=True``), or None if unusable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start afresh rather than fail
        log.warning("ignoring unreadable training checkpoint %s: %s", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring %s: not a wsiscan training checkpoint", path)
        return None
    return state


def _batches(
    loader: torch.utils.data.DataLoader, params: TrainRoundParams, what: str
) -> Iterator[Any]:
    """The loader's batches; an error in a patch-reading process is one line (the worker's own
    message names the slide), shared memory exhausted comes with its remedy."""
    from .faults import worker_batches

    side = int(getattr(loader.dataset, "patch_px", 244))
    return worker_batches(
        loader,
        where=what,
        batch_bytes=params.batch_size * side * side * 3,
        batch_key="train.batch_size",
        workers_key="train.workers",
    )


def _evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    params: TrainRoundParams,
    device: torch.device,
    hard_mask: np.ndarray,
    keys: np.ndarray,
    amp_ctx: Callable[[], Any],
) -> dict[str, float | None]:
    """Validation loss/accuracy overall, per class and on hard negatives (eval mode)."""
    from .model import to_tensor

    if len(keys) == 0:
        return {
            "val_loss": None,
            "val_acc": None,
            "val_acc_tumour": None,
            "val_acc_normal": None,
            "val_acc_hard": None,
        }
    model.eval()
    losses, correct, labels = [], [], []
    with torch.inference_mode():
        for images, y in _batches(loader, params, "validation"):
            x = to_tensor(images, device=device)
            y = y.to(device)
            with amp_ctx():
                logits = model(x).flatten(1)
            losses.append(
                torch.nn.functional.cross_entropy(logits.float(), y, reduction="none").cpu()
            )
            correct.append((logits.argmax(1) == y).cpu())
            labels.append(y.cpu())
    loss = torch.cat(losses).numpy()
    ok = torch.cat(correct).numpy()
    lab = torch.cat(labels).numpy()
    hard = hard_mask[keys]

    def mean(sel: np.ndarray) -> float | None:
        return float(ok[sel].mean()) if sel.any() else None

    return {
        "val_loss": float(loss.mean()),
        "val_acc": float(ok.mean()),
        "val_acc_tumour": mean(lab == LABEL_TUMOUR),
        "val_acc_normal": mean(lab == LABEL_NORMAL),
        "val_acc_hard": mean(hard),
    }


def plot_history(
    history: list[dict[str, Any]], step_loss: list[float], out_png: str | Path, title: str
) -> None:
    """Loss and accuracy curves (matplotlib Agg) written atomically to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    if step_loss:
        steps_per_epoch = max(1, len(step_loss) // max(1, len(history)))
        s = np.arange(1, len(step_loss) + 1) / steps_per_epoch
        ax_loss.plot(s, step_loss, color="0.75", lw=0.8, label="train loss (batch)")
        k = max(1, steps_per_epoch // 4)
        if len(step_loss) >= k:
            smooth = np.convolve(step_loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(
                s[k - 1 :], smooth, color="C0", lw=1.2, label=f"train loss ({k}-batch mean)"
            )
    ax_loss.plot(epochs, [h["loss"] for h in history], "o", color="C0", label="train loss (epoch)")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "s-", color="C1", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_ylim(bottom=0)
    ax_loss.legend(fontsize=8)
    ax_acc.plot(epochs, [h["acc"] for h in history], "o-", color="C0", label="train")
    for key, colour, name in (
        ("val_acc", "C1", "validation"),
        ("val_acc_tumour", "C3", "val tumour"),
        ("val_acc_normal", "C2", "val normal"),
        ("val_acc_hard", "C4", "val hard negatives"),
    ):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), "s--", color=colour, label=name, ms=4)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(out_png) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def _thin(values: list[float], max_points: int = 2000) -> list[float]:
    if len(values) <= max_points:
        return [float(v) for v in values]
    idx = np.linspace(0, len(values) - 1, max_points).round().astype(int)
    return [float(values[i]) for i in idx]


@dataclass
class TrainingSet:
    """The merged patch table of one round and its train / validation split (indices)."""

    table: PatchTable
    is_hard: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    hard: np.ndarray
    val_keys: np.ndarray
    patch_px: int
    stain: dict[str, Any] | None = None  # training_stain(): the reference and the slides' maps

    @property
    def stain_maps(self) -> list[Any] | None:
        return self.stain["maps"] if self.stain is not None else None


def training_set(
    patches: str | Path,
    hard_negatives: Sequence[str | Path],
    params: TrainRoundParams,
    round_index: int,
) -> TrainingSet:
    """The base patches plus the hard negatives of earlier rounds, split by slide into training
    pools and fixed validation patches; :class:`ConfigError` without training positives."""
    base = read_patch_table(patches)
    table, source = merge_tables(base, [read_patch_table(p) for p in hard_negatives])
    arch_lf = receptive_field(ARCHITECTURES[params.arch]())[0]
    lf = int(base.attrs.get("Lf", arch_lf))
    if lf != arch_lf:
        raise ConfigError(f"{patches}: patches were drawn for Lf={lf}, {params.arch} has {arch_lf}")
    is_val, is_hard = table.is_val, source > 0
    normal = table.label == LABEL_NORMAL
    data = TrainingSet(
        table=table,
        is_hard=is_hard,
        positives=np.flatnonzero(~is_val & (table.label == LABEL_TUMOUR)),
        negatives=np.flatnonzero(~is_val & normal & ~is_hard),
        hard=np.flatnonzero(~is_val & normal & is_hard),
        val_keys=_validation_keys(table, is_hard, params, round_index),
        patch_px=lf,
    )
    if len(data.positives) == 0:
        raise ConfigError(f"{patches}: no positive patches on the training (non-validation) slides")
    log.info(
        "round %d: %d train positives, %d negatives, %d hard negatives (from %d tables); "
        "%d validation patches on %d slides",
        round_index,
        len(data.positives),
        len(data.negatives),
        len(data.hard),
        len(hard_negatives),
        len(data.val_keys),
        int(table.slide_is_val.sum()),
    )
    return data


def training_stain(table: PatchTable, params: TrainRoundParams) -> dict[str, Any] | None:
    """With ``stain.normalisation: macenko``: every training slide's Macenko fit, the cohort's
    reference (one fit of their pooled stained pixels) and each slide's map onto it, as
    ``{"meta": what model.pt keeps, "maps": one StainMap (or None) per slide}``; else None."""
    if params.normalisation == "none":
        return None
    from .slide import open_slide
    from .stain import StainMap, macenko_fit, reference_fit, slide_stain_sample

    t0 = time.perf_counter()
    samples, fits = [], []
    for path, sid in zip(table.slide_path, table.slide_id, strict=True):
        with open_slide(path, sid) as slide:
            px = slide_stain_sample(slide)
        samples.append(px)
        try:
            fits.append(macenko_fit(px))
        except ValueError as exc:
            log.warning("%s: no stain fit (%s): its patches are not normalised", sid, exc)
            fits.append(None)
    try:
        reference = reference_fit([px for px in samples if len(px)])
    except ValueError as exc:
        raise ConfigError(
            f"stain.normalisation: no reference stain from the training slides: {exc}"
        )
    maps = [StainMap(f, reference) if f is not None else None for f in fits]
    log.info(
        "stain reference from %d training slides in %.1f s: H %s, E %s, max amounts %s",
        len(fits),
        time.perf_counter() - t0,
        np.round(reference.he_od[:, 0], 3).tolist(),
        np.round(reference.he_od[:, 1], 3).tolist(),
        np.round(reference.max_conc, 3).tolist(),
    )
    meta = {
        "normalisation": params.normalisation,
        "reference": reference.as_dict(),
        "slides": {
            sid: (f.as_dict() if f is not None else None)
            for sid, f in zip(table.slide_id, fits, strict=True)
        },
    }
    return {"meta": meta, "maps": maps}


def training_fingerprint(
    params: TrainRoundParams,
    round_index: int,
    files: dict[str, str | Path | Sequence[str | Path] | None],
) -> str:
    """SHA-256 of everything that determines the result (result settings and input files): a
    resumable state resumes only if it is equal."""

    def digest(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str | Path):
            return sha256_file(value)
        return [sha256_file(v) for v in value]

    blob = {
        "params": result_fields(params),
        "round": round_index,
        **{k: digest(v) for k, v in files.items()},
    }
    return sha256_json(blob)


def initial_model(
    params: TrainRoundParams,
    round_index: int,
    init_model: str | Path | None,
    imagenet_weights: str | Path | None,
) -> tuple[torch.nn.Module, str]:
    """The round's starting model (fine-tune, ImageNet trunk or seeded random) and its name."""
    from .formats.checkpoint import load_checkpoint
    from .model import ScanNet, load_torchvision_vgg16

    torch.manual_seed(int(stable_rng(params.seed, round_index, "init").integers(2**62)))
    model = ScanNet(params.arch, params.width, params.batchnorm, dropout=params.dropout)
    if init_model:
        prev, cfg = load_checkpoint(init_model)
        found = (cfg["arch"], float(cfg["width"]), bool(cfg["batchnorm"]))
        if found != (params.arch, float(params.width), bool(params.batchnorm)):
            raise ConfigError(
                f"{init_model}: model {found[0]} width {found[1]} batchnorm {found[2]} "
                f"differs from the configured {params.arch} width {params.width} "
                f"batchnorm {params.batchnorm}"
            )
        model.load_state_dict(prev.state_dict())
        return model, f"finetune:{init_model}"
    if imagenet_weights:
        load_torchvision_vgg16(model, imagenet_weights)
        return model, f"imagenet:{imagenet_weights}"
    return model, "random"


def _optimizer(model: torch.nn.Module, params: TrainRoundParams) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on biases and BatchNorm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if params.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=params.lr)
    return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=True)


def _train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    params: TrainRoundParams,
    round_index: int,
    device: torch.device,
    amp_ctx: Callable[[], Any],
) -> tuple[dict[str, Any], list[float]]:
    """One epoch of ``steps_per_epoch`` batches; returns its record and the batch losses."""
    from tqdm import tqdm

    from .model import to_tensor

    t0 = time.perf_counter()
    model.train()
    wait, losses, n_correct, n_seen, lr = 0.0, [], 0, 0, params.lr
    total_steps = params.epochs * params.steps_per_epoch
    bar = tqdm(
        total=params.steps_per_epoch,
        desc=f"round {round_index} epoch {epoch + 1}/{params.epochs}",
        unit="batch",
        file=sys.stderr,
        mininterval=5.0,
    )
    batches = _batches(loader, params, f"training round {round_index}")
    try:  # the bar ends its line also on an error, so the error line stands alone
        for step in range(params.steps_per_epoch):
            t_wait = time.perf_counter()
            images, y = next(batches)
            wait += time.perf_counter() - t_wait
            global_step = epoch * params.steps_per_epoch + step
            lr = learning_rate(global_step, total_steps, params.lr, params.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x = to_tensor(images, device=device)
            y = y.to(device, non_blocking=True)
            with amp_ctx():
                logits = model(x).flatten(1)
            loss = torch.nn.functional.cross_entropy(
                logits.float(), y, label_smoothing=params.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(
                    f"round {round_index}: loss became {value} at step {global_step}"
                )
            losses.append(value)
            n_correct += int((logits.detach().argmax(1) == y).sum())
            n_seen += int(y.shape[0])
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.2g}", refresh=False)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    record = {
        "epoch": epoch + 1,
        "loss": float(np.mean(losses)),
        "acc": n_correct / max(1, n_seen),
        "samples": n_seen,
        "samples_per_s": n_seen / train_s,
        "data_wait_s": wait,
        "train_s": train_s,
        "lr_end": lr,
    }
    return record, losses


@dataclass
class RoundState:
    """What a round carries from epoch to epoch (and what its checkpoint holds)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    resumed_from: int | None = None
    history: list[dict[str, Any]] | None = None
    step_loss: list[float] | None = None

    def resume(self, checkpoint: Path, fingerprint: str, round_index: int) -> None:
        """Continue from ``checkpoint`` when it belongs to the same set-up (``fingerprint``)."""
        self.history, self.step_loss = [], []
        state = load_train_state(checkpoint)
        if state is not None and state.get("fingerprint") != fingerprint:
            log.warning("%s belongs to another training set-up: starting afresh", checkpoint)
            state = None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.start_epoch = self.resumed_from = int(state["epoch"])
        self.history = list(state["history"])
        self.step_loss = [float(v) for v in state["step_loss"]]
        log.info(
            "resuming round %d from %s after epoch %d", round_index, checkpoint, self.start_epoch
        )

    def save(self, checkpoint: Path, fingerprint: str, epoch: int) -> None:
        """The resumable state after ``epoch`` epochs, written atomically."""
        _atomic_torch_save(
            checkpoint,
            {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "epoch": epoch,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(),
                "history": self.history,
                "step_loss": self.step_loss,
            },
        )


def round_loaders(
    data: TrainingSet, params: TrainRoundParams, round_index: int, pin_memory: bool
) -> tuple[PatchDataset, EpochSampler, dict[str, torch.utils.data.DataLoader]]:
    """The patch dataset, the epoch sampler and the training and validation loaders."""
    dataset = PatchDataset(
        data.table, data.patch_px, params, params.seed, round_index, data.stain_maps
    )
    sampler = EpochSampler(
        data.positives,
        data.negatives,
        data.hard,
        params.steps_per_epoch * params.batch_size,
        params.positive_fraction,
        params.hard_negative_fraction,
        params.seed,
        round_index,
    )
    loaders = {
        "train": make_loader(
            dataset,
            sampler,
            params.batch_size,
            params.workers,
            pin_memory,
            params.prefetch_factor,
            drop_last=True,
        ),
        "val": make_loader(
            dataset,
            [(int(k), -1) for k in data.val_keys],
            params.batch_size,
            params.workers,
            pin_memory,
            params.prefetch_factor,
        ),
    }
    return dataset, sampler, loaders


def run_epochs(
    state: RoundState,
    loaders: dict[str, torch.utils.data.DataLoader],
    sampler: EpochSampler,
    data: TrainingSet,
    params: TrainRoundParams,
    round_index: int,
    device: torch.device,
    use_amp: bool,
    checkpoint: Path,
    fingerprint: str,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
) -> None:
    """Train the remaining epochs of the round, validating and checkpointing after each."""
    model = state.model

    def amp_ctx() -> Any:
        return torch.autocast("cuda", dtype=torch.float16, enabled=use_amp)

    for epoch in range(state.start_epoch, params.epochs):
        sampler.set_epoch(epoch)
        record, losses = _train_epoch(
            model, state.opt, state.scaler, loaders["train"], epoch, params, round_index, device,
            amp_ctx,
        )  # fmt: skip
        t_val = time.perf_counter()
        record.update(
            _evaluate(model, loaders["val"], params, device, data.is_hard, data.val_keys, amp_ctx)
        )
        record["val_s"] = time.perf_counter() - t_val
        record["epoch_time_s"] = record["train_s"] + record["val_s"]
        state.history.append(record)
        state.step_loss.extend(losses)
        log.info(
            "round %d epoch %d: loss %.4f acc %.3f | val loss %s acc %s | %.1f samples/s, "
            "waited %.1f s for data",
            round_index,
            epoch + 1,
            record["loss"],
            record["acc"],
            _fmt(record["val_loss"]),
            _fmt(record["val_acc"]),
            record["samples_per_s"],
            record["data_wait_s"],
        )
        state.save(checkpoint, fingerprint, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)


#: Epoch-record keys that measure the run, not the model: in metrics.json, never in model.pt.
TIMING_KEYS = ("samples_per_s", "data_wait_s", "train_s", "val_s", "epoch_time_s")


def train_round(
    patches: str | Path,
    out_model: str | Path,
    out_metrics: str | Path,
    out_loss_png: str | Path,
    params: TrainRoundParams,
    *,
    round_index: int,
    hard_negatives: Sequence[str | Path] = (),
    init_model: str | Path | None = None,
    imagenet_weights: str | Path | None = None,
    checkpoint: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Stage ``train_round``: train round ``round_index`` -> ``model.pt``, ``metrics.json`` and
    ``loss.png``; returns the metrics.

    Training data: the base ``patches`` plus every hard-negative table in ``hard_negatives``
    (earlier rounds). The model starts from ``init_model`` (fine-tuning, rounds >= 2), else from
    ``imagenet_weights`` (torchvision VGG16 trunk) or a seeded random init. The resumable state
    goes to ``checkpoint`` (default ``checkpoint.pt`` beside ``out_model``) after each epoch;
    when it exists and belongs to the same set-up, training continues from it. It is removed
    once ``model.pt`` is written. ``on_epoch_end(epoch, record)`` runs after each epoch's
    checkpoint (tests use it to simulate a crash).
    """
    from .infer import resolve_device

    if round_index < 1:
        raise ConfigError(f"training round must be >= 1, got {round_index}")
    t_start = time.perf_counter()
    out_model = Path(out_model)
    checkpoint = Path(checkpoint or out_model.with_name("checkpoint.pt"))
    torch.set_num_threads(int(params.threads))
    device = resolve_device(params.device, "train.device")
    use_amp = bool(params.amp and device.type == "cuda")

    data = training_set(patches, hard_negatives, params, round_index)
    data.stain = training_stain(data.table, params)
    files = {"patches": patches, "hard_negatives": list(hard_negatives)}
    fingerprint = training_fingerprint(
        params, round_index, {**files, "init": init_model, "imagenet": imagenet_weights}
    )
    model, init_desc = initial_model(params, round_index, init_model, imagenet_weights)
    model.to(device)
    state = RoundState(
        model, _optimizer(model, params), torch.amp.GradScaler("cuda", enabled=use_amp)
    )
    state.resume(checkpoint, fingerprint, round_index)
    dataset, sampler, loaders = round_loaders(data, params, round_index, device.type == "cuda")

    run_epochs(
        state, loaders, sampler, data, params, round_index, device, use_amp, checkpoint,
        fingerprint, on_epoch_end,
    )  # fmt: skip
    del loaders  # stops the persistent worker processes
    dataset.close()

    metrics = round_metrics(params, round_index, data, state, init_desc, device, use_amp)
    metrics["wall_s"] = time.perf_counter() - t_start
    model.eval()
    metrics["model_sha256"] = save_round_model(
        out_model, model.cpu(), params, round_index, init_desc, state.history, files, data.stain
    )
    write_json(out_metrics, metrics)
    plot_history(
        state.history,
        state.step_loss,
        out_loss_png,
        f"training round {round_index} ({len(data.hard)} hard negatives)",
    )
    checkpoint.unlink(missing_ok=True)
    return metrics


def round_metrics(
    params: TrainRoundParams,
    round_index: int,
    data: TrainingSet,
    state: RoundState,
    init_desc: str,
    device: torch.device,
    use_amp: bool,
) -> dict[str, Any]:
    """The content of the round's ``metrics.json`` (run timings included)."""
    table = data.table
    return {
        "round": round_index,
        "init": init_desc,
        "resumed_from_epoch": state.resumed_from,
        "device": str(device),
        "amp": use_amp,
        "workers": params.workers,
        "threads": torch.get_num_threads(),
        "n_train_positive": len(data.positives),
        "n_train_negative": len(data.negatives),
        "n_train_hard_negative": len(data.hard),
        "n_val": len(data.val_keys),
        "val_slides": [s for s, v in zip(table.slide_id, table.slide_is_val, strict=True) if v],
        "params": _plain(result_fields(params)),
        "epochs": state.history,
        "step_loss": _thin(state.step_loss),
    }


def save_round_model(
    out_model: Path,
    model: torch.nn.Module,
    params: TrainRoundParams,
    round_index: int,
    init_desc: str,
    history: list[dict[str, Any]],
    files: dict[str, Any],
    stain: dict[str, Any] | None = None,
) -> str:
    """``model.pt`` with what determines it (result settings, inputs, final validation figures,
    the stain reference when the round normalised) and nothing that measures the run, so the
    same training gives the same bytes; its SHA-256."""
    from .formats.checkpoint import save_checkpoint

    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in TIMING_KEYS}
    final.pop("epoch", None)
    meta = {
        "trained": True,
        "round": round_index,
        "init": init_desc,
        "epochs": params.epochs,
        "patches_sha256": sha256_file(files["patches"]),
        "hard_negatives": [str(p) for p in files["hard_negatives"]],
        "final": final,
        "train_params": _plain(result_fields(params)),
    }
    if stain is not None:
        meta["stain"] = stain["meta"]
    return save_checkpoint(out_model, model, meta)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _validation_keys(
    table: PatchTable, is_hard: np.ndarray, params: TrainRoundParams, round_index: int
) -> np.ndarray:
    """A fixed subset of the validation slides' samples: half positives, half negatives (of
    which a ``hard_negative_fraction`` share hard), at most ``val_samples``."""
    is_val = table.is_val
    pos = np.flatnonzero(is_val & (table.label == LABEL_TUMOUR))
    neg = np.flatnonzero(is_val & (table.label == LABEL_NORMAL) & ~is_hard)
    hard = np.flatnonzero(is_val & (table.label == LABEL_NORMAL) & is_hard)
    if not (len(pos) + len(neg) + len(hard)) or params.val_patches <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = stable_rng(params.seed, round_index, "validation-keys")
    n = min(params.val_patches, len(pos) + len(neg) + len(hard))
    n_pos = min(len(pos), n // 2)
    n_hard = min(len(hard), int(round(n * params.hard_negative_fraction)), n - n_pos)
    n_neg = min(len(neg), n - n_pos - n_hard)
    keys = np.concatenate(
        [
            rng.choice(pos, n_pos, replace=False),
            rng.choice(neg, n_neg, replace=False),
            rng.choice(hard, n_hard, replace=False),
        ]
    )
    return np.sort(keys).astype(np.int64)
