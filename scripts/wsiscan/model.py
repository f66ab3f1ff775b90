"""ScanNet: the padding-free VGG16 fully convolutional network of Fast ScanNet (Lin et al.).

The network is built from a layer list (:data:`wsiscan.geometry.ARCHITECTURES`), so its scan
geometry (patch side ``Lf``, stride ``Sf``, valid ROI sides) is derived from the same definition
the ROI grid uses. Every convolution has padding 0; a ``Lf x Lf`` input gives one output, an
``Lr = Lf + n*Sf`` input gives ``(n+1) x (n+1)`` outputs at stride ``Sf`` that equal the patch
classifier applied at stride ``Sf``.

:meth:`ScanNet.forward_dense` is the single-pass dense mode ("anchor layers", a-trous): the last
``log2(alpha)`` pools run with stride 1 and every later layer is dilated, so the same weights give
the map at stride ``Sd = Sf/alpha`` in one pass.

Checkpoints (``model.pt``) are :mod:`wsiscan.formats.checkpoint`.

Input images are normalised by :func:`to_tensor` (ImageNet mean/std) in every path: inference,
training and the tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn

from . import __version__
from .errors import CheckpointError
from .formats.checkpoint import read_torch_file, save_checkpoint
from .geometry import ARCHITECTURES, Geometry, LayerSpec, receptive_field
from .params import SETTINGS, CheckModelParams, InitModelParams

log = logging.getLogger(__name__)

#: ImageNet channel mean and standard deviation (RGB, on values scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

N_CLASSES = 2


# -- input normalisation ---------------------------------------------------------------------------
def to_tensor(
    rgb_uint8_batch: np.ndarray | torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Normalise RGB uint8 images ``(N, H, W, 3)`` (or one ``(H, W, 3)``) for the network.

    Returns ``(N, 3, H, W)`` of ``dtype`` on ``device``: ``(x/255 - mean) / std`` with the ImageNet
    mean/std. The uint8 data are moved to ``device`` first (4x less transfer than float), then
    converted there into one buffer, normalised in place (the same arithmetic as out of place,
    without three more buffers of the batch's float size). ``memory_format``: the result's
    layout (``torch.channels_last`` is the uint8 images' own order; the values are the same).
    Every path (inference, training, tests) uses this one function.
    """
    x = torch.as_tensor(rgb_uint8_batch)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_tensor expects uint8 RGB images, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (N, H, W, 3) RGB images, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    n, h, w, _ = x.shape
    out = torch.empty((n, 3, h, w), dtype=dtype, device=x.device, memory_format=memory_format)
    out.copy_(x.permute(0, 3, 1, 2))
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    return out.sub_(mean).div_(std)


# -- the network -----------------------------------------------------------------------------------
def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class ScanNet(nn.Module):
    """Padding-free VGG-style FCN; logits ``(N, 2, h, w)`` at stride ``Sf``.

    Parameters
    ----------
    arch:
        Key of :data:`wsiscan.geometry.ARCHITECTURES` (``"vgg16"``).
    width:
        Channel multiplier (``1.0`` is the paper's network; the demo uses 1/8 or 1/4). Channels
        are ``max(1, round(c * width))``; the final layer keeps 2 classes.
    batchnorm:
        BatchNorm after every convolution but the last (in eval mode it is an affine map, so
        the patch/FCN equivalence is exact).
    dropout:
        Dropout probability after the head's hidden layers (``fc6``, ``fc7``) in training; the
        identity in eval mode.
    init_weights:
        False skips the random initialisation (:meth:`reset_parameters`) for a network whose
        every tensor is loaded next (a checkpoint): on torch's ``meta`` device the Kaiming init
        goes through torch's Python reference kernels and imports ``torch._dynamo`` (~1.5 s of
        every infer job's start-up); on a real device it costs the init of every weight.

    Parameter names follow torchvision: the trunk (every layer up to the last pool) is
    ``features`` with torchvision's indices (``features.N.weight``/``bias`` and BatchNorm running
    statistics), so a torchvision VGG16 / VGG16-BN state dict maps onto it; the head is ``head``
    (``head.fc6``, ``head.fc6_bn``, ...).
    """

    def __init__(
        self,
        arch: str = SETTINGS["scan.arch"].default,
        width: float = SETTINGS["model.width"].default,
        batchnorm: bool = SETTINGS["model.batchnorm"].default,
        dropout: float = 0.0,
        *,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a positive number, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.arch = arch
        self.width = float(width)
        self.batchnorm = bool(batchnorm)
        self.dropout = float(dropout)
        self.layers: list[LayerSpec] = list(ARCHITECTURES[arch]())
        self.Lf, self.Sf = receptive_field(self.layers)

        pools = [i for i, spec in enumerate(self.layers) if spec.kind == "pool"]
        last_pool = pools[-1] if pools else -1
        convs = [i for i, spec in enumerate(self.layers) if spec.kind == "conv"]
        if not convs or convs[-1] != len(self.layers) - 1:
            raise ValueError(f"architecture {arch!r} must end with a convolution (the classifier)")

        self.features = nn.Sequential()
        self.head = nn.Module()
        # per layer: (conv, bn, relu, dropout) module handles, None for pools
        self._mods: list[tuple[nn.Conv2d, nn.BatchNorm2d | None, bool, float] | None] = []
        in_ch = 3
        for i, spec in enumerate(self.layers):
            if spec.kind == "pool":
                self.features.append(nn.MaxPool2d(spec.kernel, spec.stride))
                self._mods.append(None)
                continue
            final = i == len(self.layers) - 1
            out_ch = N_CLASSES if final else _scaled(spec.out_channels, self.width)
            conv = nn.Conv2d(in_ch, out_ch, spec.kernel, stride=spec.stride, padding=0)
            bn = nn.BatchNorm2d(out_ch) if (self.batchnorm and not final) else None
            in_trunk = i < last_pool
            if in_trunk:
                self.features.append(conv)
                if bn is not None:
                    self.features.append(bn)
                self.features.append(nn.ReLU(inplace=True))
                p_drop = 0.0
            else:
                name = spec.name or f"layer{i}"
                self.head.add_module(name, conv)
                if bn is not None:
                    self.head.add_module(f"{name}_bn", bn)
                p_drop = 0.0 if final else self.dropout
            self._mods.append((conv, bn, not final, p_drop))
            in_ch = out_ch
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as torchvision's VGG: Kaiming-normal convs, BN (1, 0), final conv N(0, 0.01)."""
        final = self._mods[-1][0] if self._mods[-1] else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- geometry --------------------------------------------------------------------------------
    def geometry(self, n: int, alpha: int = 1) -> Geometry:
        """The scan geometry of this network's layer list at ROI parameter ``n`` and ``alpha``."""
        return Geometry.from_layers(self.layers, n=n, alpha=alpha, arch=self.arch)

    def config(self) -> dict[str, Any]:
        """Plain dict that rebuilds this network: arch, width, batchnorm, dropout, geometry."""
        return {
            "arch": self.arch,
            "width": self.width,
            "batchnorm": self.batchnorm,
            "dropout": self.dropout,
            "geometry": {"Lf": int(self.Lf), "Sf": int(self.Sf)},
        }

    # -- forward passes --------------------------------------------------------------------------
    def dense_plan(self, alpha: int) -> list[tuple[int, int]]:
        """Per layer ``(stride, dilation)`` of the single-pass network at dense factor ``alpha``.

        The last strided layers (pools) whose strides multiply to ``alpha`` run with stride 1;
        every layer after the first of them is dilated by the product of the strides removed
        before it (pool kernels too). ``alpha = 1`` is the plain network.
        """
        alpha = int(alpha)
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        removed: set[int] = set()
        product = 1
        for i in reversed(range(len(self.layers))):
            if product == alpha:
                break
            spec = self.layers[i]
            if spec.stride > 1:
                if spec.kind != "pool" or alpha % (product * spec.stride):
                    break
                removed.add(i)
                product *= spec.stride
        if product != alpha:
            raise ValueError(
                f"alpha={alpha} is not a product of the last pool strides of {self.arch} "
                f"(total stride Sf={self.Sf})"
            )
        plan: list[tuple[int, int]] = []
        dilation = 1
        for i, spec in enumerate(self.layers):
            if i in removed:
                plan.append((1, dilation))
                dilation *= spec.stride
            else:
                plan.append((spec.stride, dilation))
        return plan

    def _run(self, x: torch.Tensor, plan: list[tuple[int, int]]) -> torch.Tensor:
        for spec, mods, (stride, dilation) in zip(self.layers, self._mods, plan, strict=True):
            if mods is None:
                x = F.max_pool2d(x, spec.kernel, stride=stride, dilation=dilation)
                continue
            conv, bn, relu, p_drop = mods
            x = F.conv2d(x, conv.weight, conv.bias, stride=stride, dilation=dilation)
            if bn is not None:
                x = bn(x)
            if relu:
                x = F.relu(x, inplace=True)
            if p_drop > 0.0 and self.training:
                x = F.dropout(x, p_drop, training=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2, h, w)`` at stride ``Sf`` for a normalised input ``(N, 3, H, W)``.

        A ``Lf x Lf`` input (244 for VGG16) gives ``1 x 1``; ``Lf + n*Sf`` gives ``(n+1)^2``.
        """
        return self._run(x, self.dense_plan(1))

    def forward_dense(self, x: torch.Tensor, alpha: int) -> torch.Tensor:
        """Single-pass dense logits at stride ``Sd = Sf/alpha`` (anchor layers / a-trous).

        Same weights as :meth:`forward`; a block of side ``Lr + (alpha-1)*Sd`` gives
        ``alpha*Lp`` outputs per side, equal to shift-and-stitch of ``alpha^2`` shifted ROIs.
        """
        return self._run(x, self.dense_plan(alpha))

    @staticmethod
    def tumour_probability(logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the class channel; returns channel 1 (tumour), shape ``(N, h, w)``
        (see :func:`tumour_probability`)."""
        return tumour_probability(logits)


def tumour_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class channel of ``(N, 2, h, w)`` logits; the tumour channel ``(N, h, w)``
    (no gradient).

    On the CPU it is computed in float32 by NumPy, whose vectorised ``exp`` gives every element
    the same result wherever it lies in the array. torch's CPU kernels split a tensor among
    threads and finish each part with a scalar ``exp`` that differs from the vector one by 1 ulp
    on some values, so the map would depend on the number of threads (found on an AVX-512
    machine by ``tests/test_faults.py::test_killed_infer_job_is_redone_and_identical``). On a
    GPU every element runs the same code, and torch computes it there.
    """
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=1)[:, 1]
    both = logits.detach().float().numpy()
    healthy, tumour = both[:, 0], both[:, 1]
    top = np.maximum(healthy, tumour)
    e_healthy, e_tumour = np.exp(healthy - top), np.exp(tumour - top)
    return torch.from_numpy(e_tumour / (e_healthy + e_tumour))


# -- torchvision ImageNet weights ------------------------------------------------------------------
def load_torchvision_vgg16(model: ScanNet, path: str | Path) -> list[str]:
    """Load a torchvision-format VGG16 or VGG16-BN ImageNet state dict (local file) into the trunk.

    The 13 trunk convolutions are matched in order (``features.N.weight``/``bias``); BatchNorm
    parameters and running statistics are copied when both sides have BatchNorm; a VGG16-BN
    file loaded into a model without BatchNorm has its BatchNorm folded into the convolutions
    (exact in eval mode). The head (``fc6``-``fc8``) keeps its random init: torchvision's
    classifier is a 25088->4096 linear layer, not ScanNet's 2x2 conv. Shapes must match, which
    needs ``width = 1``. Returns the model's state-dict keys that were loaded.
    """
    src = read_torch_file(path)
    if "state_dict" in src and isinstance(src["state_dict"], Mapping):
        src = src["state_dict"]
    src = {k.removeprefix("module."): v for k, v in src.items() if isinstance(v, torch.Tensor)}

    def src_index(key: str) -> int | None:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            return int(parts[1])
        return None

    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        idx = src_index(key)
        if idx is not None:
            by_index.setdefault(idx, {})[key.split(".")[2]] = value
    src_convs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = []
    indices = sorted(by_index)
    for j, idx in enumerate(indices):
        entry = by_index[idx]
        if "weight" in entry and entry["weight"].ndim == 4:
            nxt = by_index.get(indices[j + 1]) if j + 1 < len(indices) else None
            bn = nxt if nxt is not None and "running_mean" in nxt else None
            src_convs.append((entry, bn))

    trunk = [
        (m, model.features[k + 1] if model.batchnorm else None, k)
        for k, m in enumerate(model.features)
        if isinstance(m, nn.Conv2d)
    ]
    if len(src_convs) != len(trunk):
        raise CheckpointError(
            path,
            f"expected a torchvision VGG16 state dict with {len(trunk)} convolutions under "
            f"'features.N.weight', found {len(src_convs)}",
        )

    loaded: list[str] = []
    with torch.no_grad():
        for n_conv, ((conv_src, bn_src), (conv, bn, k)) in enumerate(
            zip(src_convs, trunk, strict=True), start=1
        ):
            w, b = conv_src["weight"], conv_src.get("bias")
            if b is None:
                b = torch.zeros(w.shape[0], dtype=w.dtype)
            if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(
                conv.bias.shape
            ):
                raise CheckpointError(
                    path,
                    f"convolution {n_conv} has shape {tuple(w.shape)} in the file but "
                    f"{tuple(conv.weight.shape)} in the model (ImageNet weights need width 1; "
                    f"this model has width {model.width})",
                )
            w = w.to(conv.weight.dtype)
            b = b.to(conv.bias.dtype)
            if bn_src is not None and bn is None:
                # fold the file's BatchNorm into the conv: exact in eval mode
                eps = 1e-5
                scale = bn_src["weight"] / torch.sqrt(bn_src["running_var"] + eps)
                w = w * scale.view(-1, 1, 1, 1)
                b = (b - bn_src["running_mean"]) * scale + bn_src["bias"]
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            loaded += [f"features.{k}.weight", f"features.{k}.bias"]
            if bn_src is not None and bn is not None:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(bn_src[name])
                    loaded.append(f"features.{k + 1}.{name}")
                if "num_batches_tracked" in bn_src:
                    bn.num_batches_tracked.copy_(bn_src["num_batches_tracked"])
                    loaded.append(f"features.{k + 1}.num_batches_tracked")
    return loaded


def init_model(
    out_model: str | Path, params: InitModelParams, *, imagenet_weights: str | Path | None = None
) -> dict[str, Any]:
    """Stage ``init_model``: an untrained checkpoint (``train.rounds: 0``), random from
    ``params.seed`` or with the trunk of a torchvision VGG16(-BN) state dict file.

    Returns ``{"path", "sha256", "loaded_keys", ...}``.
    """
    from .fileio import sha256_file

    torch.manual_seed(int(params.seed))
    model = ScanNet(arch=params.arch, width=params.width, batchnorm=params.batchnorm)
    loaded: list[str] = []
    meta: dict[str, Any] = {"init": "random", "seed": int(params.seed), "trained": False}
    if imagenet_weights is not None:
        loaded = load_torchvision_vgg16(model, imagenet_weights)
        meta.update(init="imagenet", imagenet_sha256=sha256_file(imagenet_weights))
    sha = save_checkpoint(out_model, model, meta)
    return {
        "path": str(out_model),
        "sha256": sha,
        "loaded_keys": len(loaded),
        **model.config(),
        **meta,
    }


# -- the model check -------------------------------------------------------------------------------
def check_scans(model: ScanNet, geometry: Geometry, model_path: str | Path) -> None:
    """:class:`CheckpointError` naming ``model_path`` unless ``model`` scans ``geometry`` (the
    same architecture and layers, so the same ``Lf``, ``Sf`` and block sides)."""
    try:
        own = model.geometry(geometry.n, geometry.alpha)
    except ValueError as exc:
        raise CheckpointError(model_path, f"cannot scan the geometry {geometry.arch}: {exc}")
    if model.arch != geometry.arch or own.checksum() != geometry.checksum():
        raise CheckpointError(
            model_path,
            f"model {model.arch} (Lf={model.Lf}, Sf={model.Sf}) does not match the scan "
            f"geometry ({geometry.arch}, Lf={geometry.Lf}, Sf={geometry.Sf})",
        )


def check_model(model: str | Path, out_record: str | Path, params: CheckModelParams) -> dict:
    """Stage ``check_model``: the checkpoint inference will use, checked once on the CPU before
    any ``infer`` job runs, so that a bad ``model.checkpoint`` fails this one job (and no slide
    loses its tiles).

    Loads ``model`` with every check of :func:`wsiscan.formats.checkpoint.load_checkpoint` (a
    torch file, weights only, shapes checked before the network is built, finite weights),
    checks that it scans the configured geometry (``scan.arch``, ``scan.n``, ``scan.alpha``) and
    that one ``Lf x Lf`` patch gives finite probabilities, then writes a small JSON record
    (the model's path, SHA-256, architecture, width, BatchNorm and the geometry) and returns it.
    """
    from .fileio import sha256_file, write_json
    from .formats.checkpoint import load_checkpoint

    net, _ = load_checkpoint(model, map_location="cpu")
    geometry = Geometry.for_arch(params.arch, n=params.n, alpha=params.alpha)
    check_scans(net, geometry, model)
    with torch.no_grad():
        patch = torch.full((1, 3, net.Lf, net.Lf), 0.5)
        prob = net.tumour_probability(net(patch))
    if not bool(torch.isfinite(prob).all()):
        raise CheckpointError(model, "the network gives NaN or infinite outputs on a patch")
    record = {
        "model": str(model),
        "sha256": sha256_file(model),
        **net.config(),
        "scan_geometry": geometry.as_attrs(),
        "wsiscan_version": __version__,
    }
    write_json(out_record, record)
    log.info(
        "model %s: %s width %g%s, scans %d px blocks (n=%d, alpha=%d)",
        model,
        net.arch,
        net.width,
        " with BatchNorm" if net.batchnorm else "",
        geometry.block_side,
        geometry.n,
        geometry.alpha,
    )
    return record
