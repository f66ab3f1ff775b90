"""``model.pt``: a ScanNet checkpoint (written by ``init_model`` and ``train_round``, read by
``infer``, ``train_round`` and ``mine_negatives``).

Layout: a torch zip archive (``torch.save``) of ``{"state_dict": {name: tensor}, "config":
{...}}`` holding only tensors and plain types, so it loads with ``torch.load(...,
weights_only=True)``. ``config``: ``arch``, ``width``, ``batchnorm``, ``dropout``, ``geometry``
(``Lf``, ``Sf``), ``format`` (:data:`CHECKPOINT_FORMAT`), ``wsiscan_version`` and ``meta`` (how it
was made: init or training round, its result settings, final validation figures; no run
timings, so the same training gives the same bytes). Tensors are stored on the CPU.

A model trained on stain-normalised slides (``stain.normalisation: macenko``) keeps the training
cohort's stain in ``meta["stain"]``: ``normalisation`` (the method), ``reference`` (``he_od``: the
3x2 unit optical-density vectors of haematoxylin and eosin, RGB rows; ``max_conc``: their
99th-percentile amounts; ``n_pixels``) and ``slides`` (the same fit of every training slide, by
slide ID; provenance). :func:`stain_reference` reads it back, checked; inference and mining
normalise every slide to it.

The reader refuses anything else before building a network: pickled objects, files that are not
torch archives, another architecture, a geometry this wsiscan does not derive, tensors whose
shapes do not fit, and non-finite weights.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import CheckpointError
from ..fileio import atomic_write, sha256_file
from ..params import SETTINGS

if TYPE_CHECKING:
    import torch

    from ..model import ScanNet

CHECKPOINT_FORMAT = "wsiscan-scannet/1"


#: First bytes of a torch file: a zip archive (``torch.save`` since torch 1.6) or a pickle
#: (protocol 2 to 5; the legacy format).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _unpickler_detail(exc: BaseException) -> str:
    """The cause inside torch's weights-only error text (not its advice to load unsafely)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: (.+)", text)
    line = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else ""
    return line[:200] or type(exc).__name__


def read_torch_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a dict; :class:`CheckpointError` naming the
    file otherwise: missing, not a torch file (judged by its first bytes), truncated or damaged,
    or holding pickled Python objects (never run)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read the file: {exc}")
    if not head:
        raise CheckpointError(path, "the file is empty (0 bytes): not a torch file")
    if not head.startswith(TORCH_MAGIC):
        raise CheckpointError(
            path, f"not a torch file (it starts with {head!r}; torch files are zip archives)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                path,
                "refused: the file does not load with torch.load(weights_only=True) (it holds "
                f"the Python object {found.group(1)})",
            )
        raise CheckpointError(path, f"not a readable torch file ({_unpickler_detail(exc)})")
    except Exception as exc:  # torch raises many types for a damaged or truncated archive
        raise CheckpointError(
            path,
            "not a readable torch file, truncated or damaged "
            f"({type(exc).__name__}: {_unpickler_detail(exc)})",
        )
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict, found {type(obj).__name__}")
    return dict(obj)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The ``config`` of a checkpoint (its tensors are memory-mapped, not read): what it is and
    how it was made (``config["meta"]``, e.g. the training ``round``)."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the full reader says why; here the config is only provenance
        raise CheckpointError(path, f"not a readable torch file ({type(exc).__name__})")
    config = obj.get("config") if isinstance(obj, Mapping) else None
    if not isinstance(config, Mapping) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not a wsiscan checkpoint")
    return dict(config)


def stain_reference(config: Mapping[str, Any], path: str | Path) -> Any:
    """The stain reference (:class:`wsiscan.stain.StainFit`) a checkpoint's ``config`` keeps in
    ``meta["stain"]``, or None for a model trained on un-normalised slides;
    :class:`CheckpointError` naming ``path`` when it is malformed."""
    from ..stain import METHODS, StainFit

    stain = (config.get("meta") or {}).get("stain")
    if stain is None:
        return None
    if not isinstance(stain, Mapping) or stain.get("normalisation") not in METHODS[1:]:
        raise CheckpointError(path, f"meta.stain is not a stain normalisation record: {stain!r}")
    try:
        return StainFit.from_dict(stain.get("reference"))
    except ValueError as exc:
        raise CheckpointError(path, f"meta.stain.reference: {exc}")


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain Python types (numpy scalars converted); reject anything else."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint meta key {where}.{k!r} must be a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"checkpoint meta {where} is a {type(value).__name__}; only plain types "
        "(dict, list, str, int, float, bool, None) are allowed"
    )


def save_checkpoint(path: str | Path, model: ScanNet, meta: Mapping[str, Any] | None = None) -> str:
    """Write ``model`` and ``meta`` (plain types only) to ``path`` atomically; return the file's
    SHA-256 hex digest."""
    import torch

    config = model.config()
    config["format"] = CHECKPOINT_FORMAT
    config["wsiscan_version"] = __version__
    config["meta"] = _plain(dict(meta or {}), "meta")
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as fh:
        torch.save({"state_dict": state, "config": config}, fh)
    return sha256_file(path)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ScanNet, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True`` only).

    Returns ``(model in eval mode on map_location, config)``. The state dict is checked against
    a network built on torch's ``meta`` device (no memory) before the real one is built.
    """
    import torch

    from ..geometry import ARCHITECTURES
    from ..model import ScanNet

    obj = read_torch_file(path)
    config, state = obj.get("config"), obj.get("state_dict")
    if not isinstance(config, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(
            path, "not a wsiscan checkpoint (expected keys 'state_dict' and 'config')"
        )
    config = dict(config)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            path, f"checkpoint format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            path, f"unknown architecture {arch!r}; this wsiscan knows {sorted(ARCHITECTURES)}"
        )
    try:
        width = SETTINGS["model.width"].check(config["width"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, f"invalid model width {config.get('width')!r} ({exc})")
    try:
        kwargs = {
            "arch": arch,
            "width": width,
            "batchnorm": bool(config["batchnorm"]),
            "dropout": float(config.get("dropout", 0.0)),
        }
        with torch.device("meta"):
            shell = ScanNet(**kwargs, init_weights=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid model config {config!r}: {exc}")
    geo = config.get("geometry") or {}
    if (geo.get("Lf"), geo.get("Sf")) != (shell.Lf, shell.Sf):
        raise CheckpointError(
            path,
            f"geometry Lf={geo.get('Lf')}, Sf={geo.get('Sf')} in the file differs from "
            f"{arch}'s Lf={shell.Lf}, Sf={shell.Sf} in this wsiscan",
        )
    own = shell.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            path,
            f"state dict does not fit {arch} width={shell.width} batchnorm={shell.batchnorm}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}",
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[key].shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                path,
                f"tensor {key} has shape {found} in the file but "
                f"{tuple(own[key].shape)} in {arch} width={shell.width}",
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"tensor {key} holds NaN or infinite values")
    model = ScanNet(**kwargs, init_weights=False)  # every tensor comes from the file
    model.load_state_dict(state)
    model.to(map_location)
    model.eval()
    return model, config
