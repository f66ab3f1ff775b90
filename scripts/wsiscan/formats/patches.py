"""``results/train/patches.h5`` and ``results/train/round{k}/hard_negatives.h5``: training patch
tables (written by ``train_patches`` and ``mine_negatives``, read by ``train_round``).

Layout (HDF5):

* ``level0_xy`` (N, 2) int64: patch *centres* ``(x, y)`` in level-0 px (the ``Lf`` patch's
  top-left is the centre minus ``Lf // 2``, the patch the map scores for a cell centre);
* ``label`` (N,) uint8: 1 tumour, 0 normal;
* ``slide_index`` (N,) int32 into the slide table;
* ``probability`` (N,) float32 (hard negatives only): the model's tumour probability there;
* the slide table, one entry per slide: ``slide_id``, ``slide_path``, ``slide_label``
  (``tumor``/``normal``), ``slide_annotation`` (annotation file or ``""``), ``slide_is_val``
  (bool: held out for validation) and ``slide_mpp`` (level-0 um/px, as ``tissue_mask`` resolved
  it);
* attributes: ``format`` (:data:`FORMAT`), ``kind`` (``patches`` or ``hard_negatives``), ``Lf``,
  ``Sf``, ``arch``, the drawing or mining settings, ``wsiscan_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import SlideError
from ..fileio import atomic_h5, h5_attrs

FORMAT = "wsiscan-patches/1"
LABEL_TUMOUR = 1
LABEL_NORMAL = 0
_TEXT = ("slide_id", "slide_path", "slide_label", "slide_annotation")


@dataclass
class PatchTable:
    """Patch centres with labels and their slide table (the content of a patch table file)."""

    slide_id: list[str]
    slide_path: list[str]
    slide_label: list[str]
    slide_is_val: np.ndarray  # (S,) bool
    slide_annotation: list[str]  # annotation file per slide, "" for none
    slide_mpp: np.ndarray  # (S,) float64 level-0 um/px
    level0_xy: np.ndarray  # (N, 2) int64 x, y patch centres
    label: np.ndarray  # (N,) uint8
    slide_index: np.ndarray  # (N,) int32
    probability: np.ndarray | None = None  # (N,) float32, hard negatives only
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def is_val(self) -> np.ndarray:
        """(N,) bool: the patch lies on a validation slide."""
        return self.slide_is_val[self.slide_index] if len(self) else np.zeros(0, bool)

    def with_patches(
        self, level0_xy: np.ndarray, label: np.ndarray, slide_index: np.ndarray, probability=None
    ) -> PatchTable:
        """The same slide table with other patches."""
        return PatchTable(
            slide_id=list(self.slide_id),
            slide_path=list(self.slide_path),
            slide_label=list(self.slide_label),
            slide_is_val=self.slide_is_val.copy(),
            slide_annotation=list(self.slide_annotation),
            slide_mpp=self.slide_mpp.copy(),
            level0_xy=np.asarray(level0_xy, np.int64).reshape(-1, 2),
            label=np.asarray(label, np.uint8),
            slide_index=np.asarray(slide_index, np.int32),
            probability=None if probability is None else np.asarray(probability, np.float32),
        )


def _check(table: PatchTable) -> str | None:
    n, s = len(table), len(table.slide_id)
    if table.level0_xy.shape != (n, 2) or table.slide_index.shape != (n,):
        return "patch datasets have inconsistent lengths"
    if table.probability is not None and table.probability.shape != (n,):
        return "probability has another length than the patches"
    lengths = {len(getattr(table, k)) for k in (*_TEXT, "slide_is_val", "slide_mpp")}
    if lengths != {s}:
        return "the slide table's columns have different lengths"
    if n and (table.slide_index.min() < 0 or table.slide_index.max() >= s):
        return "slide_index points outside the slide table"
    return None


def write_patch_table(path: str | Path, table: PatchTable, attrs: dict[str, Any]) -> None:
    """Write ``table`` with ``attrs`` (``None`` values as ``""``) to ``path`` atomically."""
    import h5py

    problem = _check(table)
    if problem:
        raise ValueError(f"{path}: {problem}")
    text = h5py.string_dtype()
    with atomic_h5(path) as (f, _):
        f.create_dataset("level0_xy", data=table.level0_xy.astype(np.int64).reshape(-1, 2))
        f.create_dataset("label", data=table.label.astype(np.uint8))
        f.create_dataset("slide_index", data=table.slide_index.astype(np.int32))
        if table.probability is not None:
            f.create_dataset("probability", data=table.probability.astype(np.float32))
        for name in _TEXT:
            f.create_dataset(name, data=np.array(getattr(table, name), dtype=object), dtype=text)
        f.create_dataset("slide_is_val", data=np.asarray(table.slide_is_val, dtype=bool))
        f.create_dataset("slide_mpp", data=np.asarray(table.slide_mpp, dtype=np.float64))
        f.attrs.update(
            {
                "format": FORMAT,
                "wsiscan_version": __version__,
                **{k: ("" if v is None else v) for k, v in attrs.items()},
            }
        )


def _strings(dataset: Any) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def read_patch_table(path: str | Path) -> PatchTable:
    """Read a patch table; :class:`SlideError` naming the file when it is missing or bad."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise SlideError(None, path, "patch table not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = h5_attrs(f)
            if attrs.get("format") != FORMAT:
                raise SlideError(
                    None, path, f"not a wsiscan patch table (format {attrs.get('format')!r})"
                )
            table = PatchTable(
                **{name: _strings(f[name]) for name in _TEXT},
                slide_is_val=f["slide_is_val"][()].astype(bool),
                slide_mpp=f["slide_mpp"][()].astype(np.float64),
                level0_xy=f["level0_xy"][()].astype(np.int64).reshape(-1, 2),
                label=f["label"][()].astype(np.uint8),
                slide_index=f["slide_index"][()].astype(np.int32),
                probability=f["probability"][()].astype(np.float32) if "probability" in f else None,
                attrs=attrs,
            )
    except (OSError, KeyError) as exc:
        raise SlideError(None, path, f"patch table is not readable: {exc}")
    problem = _check(table)
    if problem:
        raise SlideError(None, path, problem)
    return table


def merge_tables(base: PatchTable, extra: Sequence[PatchTable]) -> tuple[PatchTable, np.ndarray]:
    """Base patches plus hard-negative tables, slides matched by ID.

    Returns ``(merged table, source)`` where ``source[i]`` is 0 for base patches and ``k`` for
    patches of ``extra[k-1]``. Slides only in an extra table are appended as training slides.
    """
    ids = list(base.slide_id)
    paths, labels = list(base.slide_path), list(base.slide_label)
    annotations, mpps = list(base.slide_annotation), list(base.slide_mpp)
    is_val = list(base.slide_is_val.astype(bool))
    pos = {s: i for i, s in enumerate(ids)}
    xy, lab, idx = [base.level0_xy], [base.label], [base.slide_index]
    prob = [np.full(len(base), np.nan, np.float32)]
    src = [np.zeros(len(base), np.int32)]
    for k, table in enumerate(extra, start=1):
        remap = np.zeros(len(table.slide_id), dtype=np.int32)
        for j, sid in enumerate(table.slide_id):
            if sid not in pos:
                pos[sid] = len(ids)
                ids.append(sid)
                paths.append(table.slide_path[j])
                labels.append(table.slide_label[j])
                annotations.append(table.slide_annotation[j])
                mpps.append(float(table.slide_mpp[j]))
                is_val.append(bool(table.slide_is_val[j]))
            remap[j] = pos[sid]
        xy.append(table.level0_xy)
        lab.append(table.label)
        idx.append(remap[table.slide_index] if len(table) else table.slide_index)
        prob.append(
            table.probability
            if table.probability is not None
            else np.full(len(table), np.nan, np.float32)
        )
        src.append(np.full(len(table), k, np.int32))
    merged = PatchTable(
        slide_id=ids,
        slide_path=paths,
        slide_label=labels,
        slide_is_val=np.array(is_val, dtype=bool),
        slide_annotation=annotations,
        slide_mpp=np.array(mpps, dtype=np.float64),
        level0_xy=np.concatenate(xy).reshape(-1, 2).astype(np.int64),
        label=np.concatenate(lab).astype(np.uint8),
        slide_index=np.concatenate(idx).astype(np.int32),
        probability=np.concatenate(prob).astype(np.float32),
        attrs=dict(base.attrs),
    )
    return merged, np.concatenate(src)
