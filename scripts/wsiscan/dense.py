"""Dense tiles at stride ``Sd = Sf/alpha``: the patch-classifier reference, shift-and-stitch and
the single-pass ("anchor layers") mode of Fast ScanNet.

All functions take normalised images (:func:`wsiscan.model.to_tensor`) of shape ``(N, 3, H, W)``
and run the model in eval mode without gradients (the model's mode is restored afterwards).
A block of side ``Lr + (alpha-1)*Sd`` (``Lr = Lf + n*Sf``) gives a dense tile of ``alpha*Lp``
cells per side whose cell ``(r, c)`` is the classifier's output for the ``Lf`` patch at pixel
offset ``(r*Sd, c*Sd)`` of the block: shift-and-stitch, single pass and the patch classifier at
stride ``Sd`` agree (exactly up to floating-point rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from .model import ScanNet, tumour_probability

DENSE_MODES = ("single", "shift")
Output = Literal["prob", "logits"]


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode and without autograd; restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(image, torch.Tensor):
        raise TypeError("expected a normalised float tensor (see wsiscan.model.to_tensor)")
    if image.ndim == 3:
        return image.unsqueeze(0), True
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
    return image, False


def _finish(logits: torch.Tensor, output: Output) -> torch.Tensor:
    if output == "logits":
        return logits
    if output == "prob":
        return tumour_probability(logits)
    raise ValueError(f"output must be 'prob' or 'logits', got {output!r}")


def block_n(model: ScanNet, block_side: int, alpha: int) -> int:
    """``n`` of a block side ``Lf + n*Sf + (alpha-1)*Sd``; ValueError when the side is not valid."""
    if model.Sf % alpha:
        raise ValueError(f"alpha={alpha} must divide Sf={model.Sf}")
    sd = model.Sf // alpha
    n, rest = divmod(block_side - model.Lf - (alpha - 1) * sd, model.Sf)
    if rest or n < 0:
        raise ValueError(
            f"block side {block_side} is not Lf + n*Sf + (alpha-1)*Sd = "
            f"{model.Lf} + n*{model.Sf} + {(alpha - 1) * sd} for alpha={alpha}"
        )
    return n


def patch_classifier(
    model: ScanNet,
    image: torch.Tensor,
    stride: int,
    *,
    output: Output = "prob",
    batch_size: int = 32,
) -> np.ndarray:
    """Reference: classify every ``Lf x Lf`` patch of ``image`` at ``stride`` px, patch by patch.

    ``image`` is ``(N, 3, H, W)`` (or ``(3, H, W)``), normalised. Patch ``(r, c)`` has its top-left
    at pixel ``(r*stride, c*stride)``; there are ``(H - Lf)//stride + 1`` rows (likewise columns).
    Patches are run through :meth:`ScanNet.forward` in batches of ``batch_size`` without ever
    holding all patches at once. Returns ``(N, rows, cols)`` tumour probability
    (``output="prob"``) or ``(N, 2, rows, cols)`` logits, as numpy in the model's dtype (the
    batch axis dropped for a 3-D input).
    """
    x, single = _as_batch(image)
    lf = model.Lf
    n_img, _, h, w = x.shape
    if h < lf or w < lf or stride < 1:
        raise ValueError(f"image {h}x{w} smaller than the patch side {lf}, or stride {stride} < 1")
    rows, cols = (h - lf) // stride + 1, (w - lf) // stride + 1
    where = [(b, r, c) for b in range(n_img) for r in range(rows) for c in range(cols)]
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    logits = torch.empty((n_img, 2, rows, cols), dtype=out_dtype)
    with evaluating(model):
        for start in range(0, len(where), batch_size):
            chunk = where[start : start + batch_size]
            patches = torch.stack(
                [
                    x[b, :, r * stride : r * stride + lf, c * stride : c * stride + lf]
                    for b, r, c in chunk
                ]
            )
            out = model(patches).to("cpu", out_dtype)
            if out.shape[-2:] != (1, 1):
                raise RuntimeError(f"a {lf} px patch gave {tuple(out.shape[-2:])} outputs")
            for (b, r, c), val in zip(chunk, out[:, :, 0, 0], strict=True):
                logits[b, :, r, c] = val
    result = _finish(logits, output).numpy()
    return result[0] if single else result


def shift_and_stitch(
    model: ScanNet, block: torch.Tensor, alpha: int, *, output: Output = "prob"
) -> torch.Tensor:
    """Dense tile by shift-and-stitch: ``alpha^2`` ROIs shifted by ``(i*Sd, j*Sd)``, interleaved.

    ``block`` is ``(N, 3, B, B)`` with ``B = Lr + (alpha-1)*Sd``; ``dense[alpha*r + i, alpha*c + j]
    = FCN(roi_ij)[r, c]``. Returns ``(N, T, T)`` probability or ``(N, 2, T, T)`` logits,
    ``T = alpha*Lp``, on the block's device.
    """
    x, _ = _as_batch(block)
    n = block_n(model, x.shape[-1], alpha)
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"blocks must be square, got {tuple(x.shape[-2:])}")
    sd = model.Sf // alpha
    lr, lp = model.Lf + n * model.Sf, n + 1
    with evaluating(model):
        dense = None
        for i in range(alpha):
            for j in range(alpha):
                roi = x[:, :, i * sd : i * sd + lr, j * sd : j * sd + lr]
                tile = model(roi)
                if dense is None:
                    dense = tile.new_empty((x.shape[0], tile.shape[1], alpha * lp, alpha * lp))
                dense[:, :, i::alpha, j::alpha] = tile
        return _finish(dense, output)


def single_pass(
    model: ScanNet, block: torch.Tensor, alpha: int, *, output: Output = "prob"
) -> torch.Tensor:
    """Dense tile in one pass of the dilated network (:meth:`ScanNet.forward_dense`).

    Same input and result as :func:`shift_and_stitch`; the trunk up to the anchor layer runs
    once instead of ``alpha^2`` times.
    """
    x, _ = _as_batch(block)
    n = block_n(model, x.shape[-1], alpha)
    with evaluating(model):
        logits = model.forward_dense(x, alpha)
        t = alpha * (n + 1)
        if tuple(logits.shape[-2:]) != (t, t):
            raise RuntimeError(f"single pass gave {tuple(logits.shape[-2:])}, expected {t}x{t}")
        return _finish(logits, output)


def dense_tiles(
    model: ScanNet,
    blocks: torch.Tensor,
    alpha: int,
    mode: str = "single",
    *,
    output: Output = "prob",
) -> torch.Tensor:
    """Dense tiles ``(N, alpha*Lp, alpha*Lp)`` of normalised blocks ``(N, 3, B, B)``.

    ``mode`` is ``"single"`` (default; one dilated pass) or ``"shift"`` (shift-and-stitch);
    both give the same tile. ``alpha = 1`` is the plain FCN.
    """
    if mode == "single":
        return single_pass(model, blocks, alpha, output=output)
    if mode == "shift":
        return shift_and_stitch(model, blocks, alpha, output=output)
    raise ValueError(f"dense mode must be one of {DENSE_MODES}, got {mode!r}")
