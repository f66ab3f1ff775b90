"""Slide I/O: open a whole-slide image, its levels and mpp, and read regions as RGB uint8.

Coordinates are level-0 pixels (``level0_xy``); sizes are pixels at the level read. Outside the
slide (and where the slide is transparent) reads white.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np

from .errors import SlideError, SlideIdError

SLIDE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it matches ``[A-Za-z0-9._-]+`` and is not ``.``/``..``; else raise."""
    if not SLIDE_ID_RE.match(slide_id) or slide_id in {".", ".."}:
        raise SlideIdError(f"slide ID {slide_id!r} must match [A-Za-z0-9._-]+ (and not be . or ..)")
    return slide_id


class Slide:
    """An open whole-slide image (OpenSlide), with its mpp resolved.

    ``mpp_fallback`` (um/px) is used only when the file carries no resolution.
    """

    def __init__(
        self, path: str | Path, slide_id: str | None = None, mpp_fallback: float | None = None
    ) -> None:
        import openslide

        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        if not self.path.is_file():
            what = "is a directory, not a slide file" if self.path.is_dir() else "file not found"
            raise SlideError(self.slide_id, self.path, what)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(self.slide_id, self.path, _unsupported_cause(self.path))
        except openslide.OpenSlideError as exc:
            short = "Short read" in str(exc) or "truncated" in str(exc).lower()
            what = "the file is truncated (an interrupted copy?)" if short else "cannot open slide"
            raise SlideError(self.slide_id, self.path, f"{what}: {exc}")
        except OSError as exc:  # e.g. permission denied
            raise SlideError(self.slide_id, self.path, f"cannot open slide: {exc}")
        self.mpp = self._resolve_mpp(mpp_fallback)

    def _resolve_mpp(self, fallback: float | None) -> float:
        props = self._osr.properties
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            with contextlib.suppress(KeyError, ValueError):
                values.append(float(props[key]))
        if values and all(v > 0 for v in values):
            if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * values[0]:
                raise SlideError(
                    self.slide_id,
                    self.path,
                    f"non-square pixels: mpp-x {values[0]}, mpp-y {values[1]}",
                )
            return float(np.mean(values))
        if fallback is not None and fallback > 0:
            return float(fallback)
        raise SlideError(
            self.slide_id,
            self.path,
            "no microns-per-pixel (mpp) in the file; set slide.mpp_fallback in the config",
        )

    # -- pyramid ---------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in pixels."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level`` (mpp times that level's downsample)."""
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """Index of the level whose mpp is nearest ``target_mpp`` (in log scale)."""
        mpps = np.array([self.level_mpp(i) for i in range(self.level_count)])
        return int(np.argmin(np.abs(np.log(mpps / target_mpp))))

    # -- reading ---------------------------------------------------------------------------------
    def read_rgb(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size = (width, height)`` pixels at ``level`` from top-left ``level0_xy``.

        Returns an ``(height, width, 3)`` uint8 array; outside the slide and transparent pixels
        are white. A tile that fails to decode raises :class:`SlideError`.
        """
        import openslide

        x0, y0 = (int(v) for v in level0_xy)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        try:
            rgba = np.asarray(self._osr.read_region((x0, y0), level, (w, h)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                self.slide_id,
                self.path,
                f"cannot read the {w}x{h} px region at level {level}, level0_xy=({x0}, {y0}) "
                f"(a damaged tile?): {exc}",
            )
        return _rgba_to_rgb_on_white(rgba)

    def thumbnail(self, level: int) -> np.ndarray:
        """The whole slide at ``level`` as an RGB uint8 array."""
        w, h = self.level_dimensions[level]
        return self.read_rgb((0, 0), level, (w, h))

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.slide_id!r}, {self.dimensions}, mpp={self.mpp:.4g})"


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unsupported_cause(path: Path) -> str:
    """Why OpenSlide rejected ``path``, from its first bytes: empty, a damaged TIFF or other."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot read the file: {exc}"
    if not head:
        return "the file is empty (0 bytes): not a slide"
    if head[:4] in _TIFF_MAGIC:
        return (
            "a TIFF file that OpenSlide cannot read: truncated or damaged (an interrupted "
            "copy?), or not a tiled pyramid"
        )
    return f"not a slide format OpenSlide can read (the file starts with {head[:8]!r})"


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied-free RGBA from OpenSlide on white (alpha 0 -> white)."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgba[..., :3])
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def open_slide(
    path: str | Path, slide_id: str | None = None, mpp_fallback: float | None = None
) -> Slide:
    """Open ``path`` as a :class:`Slide`; errors name the slide, the file and the cause."""
    return Slide(path, slide_id=slide_id, mpp_fallback=mpp_fallback)
