"""Slide I/O: open a whole-slide image, its levels and mpp, and read regions as RGB uint8.

Coordinates are level-0 pixels (``level0_xy``); sizes are pixels at the level read. Outside the
slide (and where the slide is transparent) reads white.

OpenSlide opens every slide and reads every level. Level 0 of a tiled JPEG TIFF (pyramidal TIFFs
such as Camelyon16's, Aperio SVS) is read directly instead: tile offsets from tifffile, the JPEG
tiles decoded by imagecodecs (libjpeg-turbo) straight into the RGB output, without OpenSlide's
ARGB surface, its PIL image and the RGBA-to-RGB pass (4.2x less time per 2884 px block, see
``benchmarks/README.md``). When a slide is opened for level-0 reads the direct reader checks
itself against OpenSlide on a tile-sized region and steps aside (logging why) if the pixels differ,
if the layout is anything else, or if a tile is missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SlideError, SlideIdError

log = logging.getLogger(__name__)

#: OpenSlide vendors whose level 0 is one tiled TIFF page (what the direct reader handles).
DIRECT_VENDORS = ("generic-tiff", "aperio")
_TIFF_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6

SLIDE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
#: Folders of ``results/`` that hold the workflow's own files: no slide may be named after one
#: (its files would mix with them, and ``rm -r results/<slide>`` would delete them).
RESERVED_SLIDE_IDS = ("benchmarks", "cohort", "logs", "model", "train")


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it can name a results folder and a command-line value; else raise
    :class:`SlideIdError` saying why: it must match ``[A-Za-z0-9._-]+``, must not start with
    ``-`` (it would read as an option), must not be ``.``/``..`` and must not be one of
    :data:`RESERVED_SLIDE_IDS` (in any case)."""
    if not SLIDE_ID_RE.match(slide_id) or slide_id in {".", ".."}:
        raise SlideIdError(f"slide ID {slide_id!r} must match [A-Za-z0-9._-]+ (and not be . or ..)")
    if slide_id.startswith("-"):
        raise SlideIdError(
            f"slide ID {slide_id!r} must not start with '-' (it would read as a command option)"
        )
    if slide_id.lower() in RESERVED_SLIDE_IDS:
        raise SlideIdError(
            f"slide ID {slide_id!r} is reserved: results/{slide_id.lower()} holds the workflow's "
            f"own files (reserved: {', '.join(RESERVED_SLIDE_IDS)})"
        )
    return slide_id


class Slide:
    """An open whole-slide image (OpenSlide), with its mpp resolved.

    ``mpp_fallback`` (um/px) is used only when the file carries no resolution.
    """

    def __init__(
        self,
        path: str | Path,
        slide_id: str | None = None,
        mpp_fallback: float | None = None,
        direct_tiles: bool = True,
    ) -> None:
        import openslide

        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        self._direct: _DirectTiles | None = None
        self._direct_pending = bool(direct_tiles)  # set up on the first level-0 read
        problem = not_a_file(self.path)
        if problem:
            raise SlideError(self.slide_id, self.path, problem)
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
        self._mpp_fallback = mpp_fallback
        self._mpp: float | None = None

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel: the file's, else ``mpp_fallback`` (resolved on first use).

        A file without a resolution, or with one outside :data:`wsiscan.params.PLAUSIBLE_MPP`
        (a 72 dpi TIFF says 352.8 um/px), uses the fallback (logged) or fails naming
        ``slide.mpp_fallback``; non-square pixels fail.
        """
        if self._mpp is None:
            self._mpp = self._resolve_mpp(self._mpp_fallback)
        return self._mpp

    def _resolve_mpp(self, fallback: float | None) -> float:
        own, problem = mpp_from_properties(self._osr.properties)
        if own is not None:
            return own
        if problem.startswith("non-square"):
            raise SlideError(self.slide_id, self.path, problem)
        if fallback is not None and fallback > 0:
            log.info("%s: %s; using slide.mpp_fallback %g um/px", self.slide_id, problem, fallback)
            return float(fallback)
        raise SlideError(
            self.slide_id, self.path, f"{problem}; set slide.mpp_fallback in the config"
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
        if level == 0:
            if self._direct_pending:
                self._direct_pending = False
                self._direct = _DirectTiles.open(self)
            if self._direct is not None:
                try:
                    rgb = self._direct.read(x0, y0, w, h)
                except Exception as exc:  # imagecodecs raises its own error types
                    raise self._read_error(x0, y0, w, h, level, exc)
                if rgb is not None:
                    return rgb
        try:
            rgba = np.asarray(self._osr.read_region((x0, y0), level, (w, h)))
        except openslide.OpenSlideError as exc:
            self.reopen()  # the handle keeps failing after an error
            raise self._read_error(x0, y0, w, h, level, exc)
        return _rgba_to_rgb_on_white(rgba)

    def reopen(self) -> None:
        """Open the file again through OpenSlide. An OpenSlide handle that met an error (a tile
        it cannot decode) fails every later call with that error, wherever it reads."""
        import openslide

        try:
            fresh = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            log.debug("%s: cannot reopen %s: %s", self.slide_id, self.path, exc)
            return
        self._osr.close()
        self._osr = fresh

    def _read_error(self, x0: int, y0: int, w: int, h: int, level: int, exc: Exception):
        return SlideError(
            self.slide_id,
            self.path,
            f"cannot read the {w}x{h} px region at level {level}, level0_xy=({x0}, {y0}) "
            f"(a damaged tile?): {exc}",
        )

    @property
    def reads_tiles_directly(self) -> bool:
        """Whether level-0 reads bypass OpenSlide (known after the first level-0 read)."""
        return self._direct is not None

    def thumbnail(self, level: int) -> np.ndarray:
        """The whole slide at ``level`` as an RGB uint8 array."""
        w, h = self.level_dimensions[level]
        return self.read_rgb((0, 0), level, (w, h))

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.slide_id!r}, {self.dimensions}, {self.path})"


def mpp_from_properties(props: Any) -> tuple[float | None, str]:
    """The level-0 resolution (um/px) in OpenSlide ``properties``: ``(mpp, "")``, or ``(None,
    why not)`` when it is missing, implausible or not square."""
    from .params import PLAUSIBLE_MPP

    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        with contextlib.suppress(KeyError, ValueError):
            values.append(float(props[key]))
    values = [v for v in values if np.isfinite(v) and v > 0]
    if not values:
        return None, "no microns-per-pixel (mpp) in the file"
    if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * values[0]:
        return None, f"non-square pixels: mpp-x {values[0]}, mpp-y {values[1]}"
    mpp = float(np.mean(values))
    low, high = PLAUSIBLE_MPP
    if not low <= mpp <= high:
        return None, (
            f"the file's resolution {mpp:g} um/px is not a slide's (plausible: {low}-{high} um/px)"
        )
    return mpp, ""


def file_mpp(path: str | Path) -> float | None:
    """The plausible level-0 resolution a slide file carries, or None (also when unreadable)."""
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as osr:
            return mpp_from_properties(osr.properties)[0]
    except (openslide.OpenSlideError, OSError):
        return None


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file one can read (``file not found``, ``is a directory``,
    ``is a named pipe (FIFO)``, ...), or None when it is one. Symbolic links are followed."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if path.is_symlink() else "file not found"
    except PermissionError as exc:
        return f"cannot be read: {exc.strerror}"
    except OSError as exc:
        return f"cannot be read: {exc}"
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"is {kind}, not a file" if kind != "not a regular file" else "is not a regular file"


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
    if np.all(rgba[..., 3] == 255):
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class _DirectTiles:
    """Level 0 of a tiled JPEG TIFF, read tile by tile (tifffile layout, imagecodecs decoding).

    Each process that reads gets its own file descriptor (``os.pread``: no shared file offset);
    a worker process forked after the first read re-opens the file.
    """

    def __init__(self, path: Path, page: Any) -> None:
        self.path = path
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.tiles_across = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.jpegtables = page.jpegtables
        self._decode = page.decode
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def open(cls, slide: Slide) -> _DirectTiles | None:
        """The direct reader of ``slide``'s level 0, or None (with the reason logged at debug
        level, or as a warning when it disagrees with OpenSlide)."""
        import tifffile

        vendor = slide._osr.properties.get("openslide.vendor")
        if vendor not in DIRECT_VENDORS:
            log.debug("%s: level 0 through OpenSlide (vendor %s)", slide.slide_id, vendor)
            return None
        try:
            with tifffile.TiffFile(slide.path) as tif:
                pages = [
                    p
                    for p in tif.pages
                    if p.is_tiled and (p.imagewidth, p.imagelength) == slide.dimensions
                ]
                if len(pages) != 1:
                    return None
                page = pages[0]
                ok = (
                    page.compression == _TIFF_JPEG
                    and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
                    and page.samplesperpixel == 3
                    and page.bitspersample == 8
                    and page.planarconfig == 1
                    and page.tiledepth == 1
                    and len(page.dataoffsets) == cls._n_tiles(page)
                )
                if not ok:
                    log.debug("%s: level 0 is not a plain JPEG tile grid", slide.slide_id)
                    return None
                reader = cls(slide.path, page)
        except Exception as exc:  # not a TIFF tifffile can parse: OpenSlide reads it
            log.debug("%s: no direct tile reader: %s", slide.slide_id, exc)
            return None
        # check against OpenSlide on one tile-sized region at the centre of the slide
        w, h = min(reader.tile_w, reader.width), min(reader.tile_h, reader.height)
        x, y = (reader.width - w) // 2, (reader.height - h) // 2
        try:
            mine = reader.read(x, y, w, h)
            theirs = _rgba_to_rgb_on_white(np.asarray(slide._osr.read_region((x, y), 0, (w, h))))
        except Exception as exc:  # a damaged tile: OpenSlide reports it on the real read
            log.debug("%s: direct tile reader not checked (%s)", slide.slide_id, exc)
            reader.close()
            slide.reopen()  # if OpenSlide met the damage, its handle would fail every read
            return None
        if mine is None or not np.array_equal(mine, theirs):
            log.warning(
                "%s: direct JPEG tile decoding differs from OpenSlide; reading through OpenSlide",
                slide.slide_id,
            )
            reader.close()
            return None
        return reader

    @staticmethod
    def _n_tiles(page: Any) -> int:
        return -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
        """RGB uint8 ``(h, w, 3)`` at level-0 ``(x0, y0)``, white outside the image; None when a
        tile is missing from the file (OpenSlide decides what it shows)."""
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, self.width), min(y0 + h, self.height)
        inside = (cx0, cy0, cx1, cy1) == (x0, y0, x0 + w, y0 + h)
        # the tiles cover a region inside the image completely: no white fill to write first
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        fd = self._file()
        tw, th = self.tile_w, self.tile_h
        for ty in range(cy0 // th, (cy1 - 1) // th + 1):
            for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                i = ty * self.tiles_across + tx
                if self.counts[i] <= 0:
                    return None
                data = os.pread(fd, int(self.counts[i]), int(self.offsets[i]))
                tile = self._decode(data, i, jpegtables=self.jpegtables)[0][0]
                sx0, sy0 = max(cx0, tx * tw), max(cy0, ty * th)
                sx1 = min(cx1, tx * tw + tile.shape[1])
                sy1 = min(cy1, ty * th + tile.shape[0])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw
                ]
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def open_slide(
    path: str | Path,
    slide_id: str | None = None,
    mpp_fallback: float | None = None,
    direct_tiles: bool = True,
) -> Slide:
    """Open ``path`` as a :class:`Slide`; errors name the slide, the file and the cause.

    ``direct_tiles=False`` reads every level through OpenSlide (the reference).
    """
    return Slide(path, slide_id=slide_id, mpp_fallback=mpp_fallback, direct_tiles=direct_tiles)
