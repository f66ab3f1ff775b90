"""Parameter records of the training stage (``train_round``).

Plain dataclasses without torch, so that the command line shows their defaults without importing
it (``wsiscan`` starts in a fraction of a second for the stages that do not need torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class AugmentParams:
    """Patch augmentation: flips, 90-degree rotations and modest colour jitter (factors)."""

    flips: bool = True
    rotate90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02  # fraction of a full hue turn


@dataclass(frozen=True)
class TrainParams:
    """Everything one training round needs besides its files (see config ``train:``)."""

    round_index: int = 1
    arch: str = "vgg16"
    width: float = 0.125
    batchnorm: bool = True
    dropout: float = 0.2
    epochs: int = 3
    samples_per_epoch: int = 1024
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    positive_fraction: float = 0.5
    hard_negative_fraction: float = 0.3
    val_samples: int = 256
    augment: AugmentParams = AugmentParams()
    workers: int = 2
    prefetch_factor: int = 4
    threads: int | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    mpp_fallback: float | None = None

    def __post_init__(self) -> None:
        if self.round_index < 1:
            raise ConfigError(f"training round must be >= 1, got {self.round_index}")
        if self.epochs < 1:
            raise ConfigError(f"train epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.workers < 0:
            raise ConfigError(f"train.workers must be >= 0, got {self.workers}")

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.samples_per_epoch // self.batch_size)

    def fingerprint_fields(self) -> dict[str, Any]:
        """Parameters that change the result (not workers, threads, device or prefetching)."""
        d = asdict(self)
        for key in ("workers", "prefetch_factor", "threads", "device", "mpp_fallback"):
            d.pop(key)
        return d
