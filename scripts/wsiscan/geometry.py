"""Scan geometry derived from a layer list: patch side, stride, ROI/block sides and strides.

All sides and strides are in level-0 pixels of the level the network reads (the scan level).

Notation (Lin et al., Fast ScanNet):

* ``Lf`` patch side the network classifies (its receptive field), ``Sf`` its total stride.
* ``Lr = Lf + n*Sf`` a valid ROI side; the FCN maps it to a ``Lp = n + 1`` square tile.
* ``Sr = Sf * Lp`` ROI stride, so neighbouring tiles abut with no gap and no overlap.
* ``Sd = Sf / alpha`` dense stride; a block of side ``Lr + (alpha-1)*Sd`` gives a dense tile of
  side ``alpha * Lp`` (shift-and-stitch or the single-pass dilated network).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

ALPHAS = (1, 2, 4)


@dataclass(frozen=True)
class LayerSpec:
    """One spatial layer: a convolution (``conv``) or a max-pool (``pool``), padding 0.

    ``out_channels`` is given for convolutions at width 1; the model scales it by its width.
    """

    kind: Literal["conv", "pool"]
    kernel: int
    stride: int = 1
    out_channels: int = 0
    name: str = ""


def vgg16_layers() -> list[LayerSpec]:
    """ScanNet's VGG16: 13 conv 3x3 + 5 max-pools 2x2, head conv 2x2, 1x1, 1x1 (2 classes)."""
    cfg = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    layers: list[LayerSpec] = []
    for block, (channels, repeats) in enumerate(cfg, start=1):
        for i in range(1, repeats + 1):
            layers.append(LayerSpec("conv", 3, 1, channels, f"conv{block}_{i}"))
        layers.append(LayerSpec("pool", 2, 2, 0, f"pool{block}"))
    layers.append(LayerSpec("conv", 2, 1, 1024, "fc6"))
    layers.append(LayerSpec("conv", 1, 1, 1024, "fc7"))
    layers.append(LayerSpec("conv", 1, 1, 2, "fc8"))
    return layers


ARCHITECTURES = {"vgg16": vgg16_layers}


def receptive_field(layers: list[LayerSpec]) -> tuple[int, int]:
    """Return ``(Lf, Sf)``: receptive field side and total stride of a padding-free layer list."""
    rf, stride = 1, 1
    for layer in layers:
        rf += (layer.kernel - 1) * stride
        stride *= layer.stride
    return rf, stride


def output_side(layers: list[LayerSpec], side: int) -> int | None:
    """Output side for an input side, or None when a layer would drop pixels (invalid input)."""
    for layer in layers:
        side -= layer.kernel
        if side < 0 or side % layer.stride:
            return None
        side = side // layer.stride + 1
    return side


@dataclass(frozen=True)
class Geometry:
    """The scan geometry of one network (derived, never typed in) at a chosen ``n`` and ``alpha``."""

    arch: str
    Lf: int
    Sf: int
    n: int
    alpha: int

    @classmethod
    def from_layers(
        cls, layers: list[LayerSpec], n: int, alpha: int = 1, arch: str = "custom"
    ) -> Geometry:
        """Derive the geometry of ``layers`` and check that ``Lr = Lf + n*Sf`` is a valid input."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        lf, sf = receptive_field(layers)
        if alpha not in ALPHAS or sf % alpha:
            raise ValueError(f"alpha must be one of {ALPHAS} and divide Sf={sf}, got {alpha}")
        geo = cls(arch=arch, Lf=lf, Sf=sf, n=n, alpha=alpha)
        out = output_side(layers, geo.Lr)
        if out != geo.Lp:
            raise ValueError(
                f"ROI side {geo.Lr} is not a valid input of {arch} (output {out}, expected {geo.Lp})"
            )
        if output_side(layers, lf) != 1:
            raise ValueError(f"patch side {lf} does not map to one output of {arch}")
        return geo

    @classmethod
    def for_arch(cls, arch: str, n: int, alpha: int = 1) -> Geometry:
        """Geometry of a named architecture (``vgg16``)."""
        try:
            layers = ARCHITECTURES[arch]()
        except KeyError:
            raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        return cls.from_layers(layers, n=n, alpha=alpha, arch=arch)

    @classmethod
    def for_roi_side(cls, arch: str, Lr: int, alpha: int = 1) -> Geometry:
        """Geometry from a requested ROI side; it must be ``Lf + n*Sf`` for an integer n."""
        lf, sf = receptive_field(ARCHITECTURES[arch]())
        n, rest = divmod(Lr - lf, sf)
        if rest or n < 0:
            raise ValueError(
                f"ROI side {Lr} is not Lf + n*Sf = {lf} + n*{sf}; nearest valid: "
                f"{lf + max(n, 0) * sf} or {lf + (max(n, 0) + 1) * sf}"
            )
        return cls.for_arch(arch, n=n, alpha=alpha)

    @property
    def Lr(self) -> int:
        """ROI side in pixels: ``Lf + n*Sf``."""
        return self.Lf + self.n * self.Sf

    @property
    def Lp(self) -> int:
        """FCN tile side in cells for one ROI: ``n + 1``."""
        return self.n + 1

    @property
    def Sr(self) -> int:
        """Stride between neighbouring ROIs/blocks in pixels: ``Sf * Lp``."""
        return self.Sf * self.Lp

    @property
    def Sd(self) -> int:
        """Dense output stride in pixels: ``Sf / alpha``."""
        return self.Sf // self.alpha

    @property
    def block_side(self) -> int:
        """Side of the block read per dense tile in pixels: ``Lr + (alpha-1)*Sd``."""
        return self.Lr + (self.alpha - 1) * self.Sd

    @property
    def tile_side(self) -> int:
        """Side of the dense tile of one block in cells: ``alpha * Lp``."""
        return self.alpha * self.Lp

    @property
    def origin(self) -> int:
        """Top-left (x and y) of block (0, 0) in level-0 pixels of the scan level.

        Chosen so that map cell ``k`` (covering ``[k*Sd, (k+1)*Sd)``) holds the patch whose centre
        is the cell centre: ``origin = Sd/2 - Lf/2`` (floor), negative, read as white.
        """
        return (self.Sd - self.Lf) // 2

    def as_attrs(self) -> dict[str, int | str]:
        """Plain dict of every parameter and derived side, for HDF5 attributes and JSON."""
        d: dict[str, int | str] = asdict(self)
        d.update(
            Lr=self.Lr,
            Lp=self.Lp,
            Sr=self.Sr,
            Sd=self.Sd,
            block_side=self.block_side,
            tile_side=self.tile_side,
            origin=self.origin,
        )
        return d

    def checksum(self) -> str:
        """Short SHA-256 of the geometry parameters, to check that stages agree."""
        blob = json.dumps(self.as_attrs(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_attrs(cls, attrs: dict) -> Geometry:
        """Rebuild from attributes written by :meth:`as_attrs` and verify the checksum if present."""
        geo = cls.for_arch(str(attrs["arch"]), n=int(attrs["n"]), alpha=int(attrs["alpha"]))
        stored = attrs.get("geometry_checksum")
        if stored is not None:
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if stored != geo.checksum():
                raise ValueError(
                    f"geometry checksum mismatch: stored {stored}, derived {geo.checksum()}"
                )
        return geo
