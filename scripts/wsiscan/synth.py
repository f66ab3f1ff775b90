"""The embedded demo cohort: synthetic H&E-like whole-slide images with ASAP annotations.

A slide is described by a small :class:`SlidePlan` (tissue pieces as a coarse signed-distance field,
lesion polygons, tumour-mimicking regions, artefacts, stain parameters), computed from
``(seed, slide_id)`` alone. :class:`SlideRenderer` turns any level-0 region of a plan into RGB pixels;
every pixel depends only on its position, so regions rendered separately tile seamlessly (nuclei come
from per-block seeded lattices and are drawn into every region they touch). :func:`synth_slide`
streams level 0 strip by strip into a pyramidal tiled JPEG TIFF (one page per level, what OpenSlide
reads) and derives the reduced levels on the fly, keeping them JPEG-encoded in a temporary file:
memory is bounded by the slide width, never its area.

Appearance (Beer-Lambert mix of haematoxylin and eosin optical densities):

* background: glass at ~240 with slight noise, pen strokes (blue/green/black) and dust on some slides;
* normal lymph-node tissue: pink fibrous stroma (eosin) densely packed with small dark round nuclei
  (lymphocyte-like, radius ~3-4 um);
* tumour: larger (4.4-6.4 um), paler, irregular, vesicular nuclei with a dark rim, coarse chromatin
  and nucleoli, a fifth of the positions left to infiltrating lymphocytes, on stroma of almost the
  same colour (a little less collagen, slightly more purple): a texture difference, not a colour
  shift;
* tumour mimics on every normal slide and most tumour slides: germinal-centre-like clusters of
  nuclei as large as tumour nuclei but round, smooth and solid (no rim, no nucleoli), mixed with
  lymphocytes. A model trained on random patches scores them as tumour at first; hard-negative
  mining is what teaches it the difference.

Acquisition (the method notes' third problem): a slide may belong to a *centre*
(:data:`DEMO_CENTRES`, the sheet's ``centre`` column), a lab with its own stain (haematoxylin and
eosin optical densities per unit stain and stain amounts) and its own scanner (white balance of the
light, optical blur, pixel noise, JPEG quality). The demo cohort trains on centres ``A`` and ``B``
and tests on those and on ``C``, whose stain lies outside theirs: paler, bluer haematoxylin and
stronger, more orange eosin, a warm white balance, a softer and noisier scan, stronger JPEG
compression (in the spirit of Camelyon17's five centres, whose slides range from pale pink to dark
purple). A slide without a centre has the look every demo slide had before centres existed. The
centre changes pixels only: the tissue, lesions and annotations of a slide are the same in every
centre.

Lesions (tumour slides): macro-metastases (0.8-1.5 mm major axis on demo-size slides, up to 4 mm on
Camelyon-size ones), micro-metastases (0.3-0.8 mm), ITC-sized clusters (major axis 50-150 um, so
< 275 um after the evaluation's 75 um growth), some touching the tissue border (clipped to the
tissue), occasional ``_2`` exclusions inside a tumour; groups ``Tumor``, ``_0`` or ``_1``. The annotation polygons are exactly what is painted: a pixel is tumour
when its centre is inside a tumour polygon, outside every ``_2`` polygon, and on tissue.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from . import __version__
from .annotations import EXCLUSION_GROUPS, Annotation, fill_polygon, write_asap_xml
from .errors import ConfigError
from .fileio import atomic_write
from .params import SETTINGS, SynthSlideParams
from .slide import check_slide_id

log = logging.getLogger(__name__)

# -- demo defaults (config/config.yaml `demo:` mirrors these) -------------------------------------

# -- file layout ---------------------------------------------------------------------------------
TILE_PX = 256
JPEG_QUALITY = 88
JPEG_SUBSAMPLING = (2, 2)  # YCbCr 4:2:0 as in the Camelyon16 TIFFs
MIN_LEVEL_SIDE_PX = 1000  # halve until the larger side of a level is below this
STRIP_PX = 2 * TILE_PX  # level-0 rows rendered per step
CHUNK_PX = 2048  # level-0 columns per render call (a multiple of 2 * TILE_PX)

# -- appearance (physical units) -----------------------------------------------------------------
FIELD_CELL_UM = 16.0  # resolution of the coarse tissue and stain fields
EDGE_NOISE_UM = 6.0  # raggedness of tissue borders
TEXTURE_PERIOD_PX = 512  # periodic noise textures (fibres, borders)
NOISE_PERIOD_PX = 509  # periodic pixel noise (prime, so it never lines up with the textures)
N_SPRITES = 48  # nucleus variants per kind
H_OD = np.array([0.62, 0.74, 0.29])  # haematoxylin optical density per unit stain (natural log)
E_OD = np.array([0.05, 0.89, 0.45])  # eosin
STROMA_E = 0.34
STROMA_H = 0.07
FIBRE_AMP = 0.24
BLOTCH_AMP = 0.16  # isotropic stroma texture (~3 um)
TUMOUR_FIBRE_FACTOR = 0.70  # tumour nests show less collagen
TUMOUR_E_FACTOR = 0.92  # tumour stroma: slightly paler ...
TUMOUR_H_ADD = 0.04  # ... and a little more purple (cytoplasm)
PIXEL_NOISE_OD = 0.018
WHITE_RGB = (241.0, 240.0, 243.0)  # light through the glass (white balance)


@dataclass(frozen=True)
class Centre:
    """A lab of the demo cohort: its stain and its scanner.

    ``h_od``/``e_od``: optical density (natural log, per RGB channel) of one unit of haematoxylin
    / eosin; ``h_amount``/``e_amount`` scale every stain amount of the slide (staining time,
    dye concentration, section thickness); ``white_rgb``: the light through bare glass (white
    balance); ``blur_um``: Gaussian sigma of the optics; ``noise_od``: pixel noise (optical
    density); ``jpeg_quality``: the scanner's JPEG quality. Each slide varies a little around its
    centre (about +-8% stain amount, +-0.02 optical density per channel, +-3 grey levels of white).
    """

    name: str
    h_od: tuple[float, float, float] = tuple(H_OD)
    e_od: tuple[float, float, float] = tuple(E_OD)
    h_amount: float = 1.0
    e_amount: float = 1.0
    white_rgb: tuple[float, float, float] = WHITE_RGB
    blur_um: float = 0.0
    noise_od: float = PIXEL_NOISE_OD
    jpeg_quality: int = JPEG_QUALITY


#: The look of a slide without a centre (every demo slide before centres existed).
NO_CENTRE = Centre("")
#: The demo cohort's centres: A and B train, C (a stain outside theirs) is held out.
DEMO_CENTRES: dict[str, Centre] = {
    c.name: c
    for c in (
        Centre("A", blur_um=0.15, jpeg_quality=90),
        Centre(
            "B", h_od=(0.54, 0.78, 0.32), e_od=(0.08, 0.86, 0.42), h_amount=1.15,
            e_amount=0.9, white_rgb=(238.0, 240.0, 245.0), blur_um=0.25, noise_od=0.015,
            jpeg_quality=92,
        ),
        Centre(
            "C", h_od=(0.76, 0.66, 0.20), e_od=(0.02, 0.80, 0.62), h_amount=0.7,
            e_amount=1.3, white_rgb=(247.0, 238.0, 224.0), blur_um=0.35, noise_od=0.025,
            jpeg_quality=75,
        ),
    )
}  # fmt: skip


def demo_centre(name: str, slide_id: str = "") -> Centre:
    """The centre called ``name`` (``""``: :data:`NO_CENTRE`); :class:`ConfigError` otherwise."""
    if not name:
        return NO_CENTRE
    try:
        return DEMO_CENTRES[name]
    except KeyError:
        raise ConfigError(
            f"synth {slide_id}: unknown demo centre {name!r}; the demo centres are "
            f"{', '.join(DEMO_CENTRES)} (or none)"
        ) from None


@dataclass(frozen=True)
class NucleusKind:
    """Shape, stain and spacing of one kind of nucleus (sizes in micrometres)."""

    name: str
    radius_um: tuple[float, float]
    aspect: tuple[float, float]
    roughness: float  # amplitude of boundary harmonics (0: smooth ellipse)
    h_inside: tuple[float, float]
    h_rim: float  # haematoxylin at the nuclear membrane (vesicular nuclei: >> h_inside)
    rim_um: float
    speckle: float  # chromatin texture amplitude
    speckle_um: float
    nucleoli: tuple[int, int]  # count range
    nucleolus_um: float
    spacing_um: float  # lattice spacing of candidate positions
    jitter: float = 0.4  # positional jitter in units of spacing


LYMPHOCYTE = NucleusKind(
    "lymphocyte",
    radius_um=(2.7, 3.6),
    aspect=(1.0, 1.15),
    roughness=0.03,
    h_inside=(1.25, 1.95),
    h_rim=1.8,
    rim_um=0.8,
    speckle=0.10,
    speckle_um=0.6,
    nucleoli=(0, 0),
    nucleolus_um=0.0,
    spacing_um=7.4,
)
TUMOUR = NucleusKind(
    "tumour",
    radius_um=(4.4, 6.4),
    aspect=(1.1, 1.6),
    roughness=0.10,
    h_inside=(0.65, 0.9),
    h_rim=1.5,
    rim_um=0.8,
    speckle=0.26,
    speckle_um=0.7,
    nucleoli=(1, 2),
    nucleolus_um=0.85,
    spacing_um=12.5,
)
MIMIC = NucleusKind(
    "mimic",
    radius_um=(4.2, 5.8),
    aspect=(1.0, 1.25),
    roughness=0.03,
    h_inside=(1.0, 1.25),
    h_rim=1.1,
    rim_um=0.7,
    speckle=0.10,
    speckle_um=0.6,
    nucleoli=(0, 0),
    nucleolus_um=0.0,
    spacing_um=11.0,
)
KINDS = (LYMPHOCYTE, TUMOUR, MIMIC)
TIL_FRACTION = 0.20  # lymphocytes kept inside tumour
GC_LYMPHOCYTES = 0.40  # lymphocytes kept inside mimic regions
HISTIOCYTE_FRACTION = 0.02  # mimic-like nuclei scattered in normal tissue
TUMOUR_FILL = 0.80  # fraction of tumour lattice positions holding a nucleus
MIMIC_FILL = 0.85


# -- plan ----------------------------------------------------------------------------------------
@dataclass
class Lesion:
    """One annotated tumour region (level-0 polygon) and how it was made."""

    kind: str  # macro | micro | itc
    group: str  # ASAP group: Tumor, _0 or _1
    level0_xy: np.ndarray
    touches_border: bool
    major_axis_um: float
    area_um2: float


@dataclass
class Artefact:
    """A pen stroke or dust speck: polygon and optical density added where it lies."""

    kind: str  # pen | dust
    level0_xy: np.ndarray
    od_rgb: np.ndarray  # (3,)


@dataclass
class SlidePlan:
    """Everything that defines a synthetic slide; pixels follow from it by :class:`SlideRenderer`."""

    slide_id: str
    label: str
    seed: int
    seed_int: int
    width_px: int
    height_px: int
    mpp: float
    cell_px: float  # coarse field cell side in level-0 pixels
    sd_um: np.ndarray  # coarse signed distance to the tissue border (um, > 0 inside)
    density: np.ndarray  # coarse lymphocyte density in [0, 1]
    stain: np.ndarray  # coarse stain intensity factor
    fibre_mix: np.ndarray  # coarse weight between the two fibre orientations
    tissue_pieces: int
    tissue_fraction: float
    lesions: list[Lesion] = field(default_factory=list)
    exclusions: list[np.ndarray] = field(default_factory=list)
    mimics: list[np.ndarray] = field(default_factory=list)
    artefacts: list[Artefact] = field(default_factory=list)
    h_od: np.ndarray = field(default_factory=lambda: H_OD.copy())
    e_od: np.ndarray = field(default_factory=lambda: E_OD.copy())
    background_rgb: np.ndarray = field(default_factory=lambda: np.array(WHITE_RGB))
    fibre_angles: tuple[float, float] = (0.0, 1.0)
    centre: str = ""
    blur_px: float = 0.0  # Gaussian sigma of the scanner optics (level-0 pixels)
    noise_od: float = PIXEL_NOISE_OD
    jpeg_quality: int = JPEG_QUALITY

    def annotations(self) -> list[Annotation]:
        """The ASAP annotations of this slide: tumour polygons, then ``_2`` exclusions."""
        out = [
            Annotation(f"Annotation {i}", les.group, les.level0_xy)
            for i, les in enumerate(self.lesions)
        ]
        n = len(out)
        out += [
            Annotation(f"Annotation {n + i}", EXCLUSION_GROUPS[0], xy)
            for i, xy in enumerate(self.exclusions)
        ]
        return out

    def level_sizes(self) -> list[tuple[int, int]]:
        """Pyramid level sizes ``(width, height)``."""
        return pyramid_level_sizes(self.width_px, self.height_px)


def pyramid_level_sizes(
    width_px: int, height_px: int, min_side_px: int = MIN_LEVEL_SIDE_PX
) -> list[tuple[int, int]]:
    """Level sizes: halve (rounding up) until the larger side is below ``min_side_px``."""
    sizes = [(int(width_px), int(height_px))]
    while max(sizes[-1]) >= min_side_px:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def slide_seed(seed: int, slide_id: str) -> int:
    """Stable 63-bit seed of one slide from the cohort seed and its ID (SHA-256, not ``hash()``)."""
    digest = hashlib.sha256(f"wsiscan-synth:{int(seed)}:{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- polygon helpers -----------------------------------------------------------------------------
def _polygon_moments(xy: np.ndarray) -> tuple[float, float]:
    """Area and ellipse-fit major axis (4 sqrt(largest central second moment)) of a polygon."""
    x, y = xy[:, 0], xy[:, 1]
    x = x - x.mean()
    y = y - y.mean()
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    if abs(area) < 1e-12:
        return 0.0, 0.0
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    ixx = ((x * x + x * x1 + x1 * x1) * cross).sum() / (12 * area) - cx * cx
    iyy = ((y * y + y * y1 + y1 * y1) * cross).sum() / (12 * area) - cy * cy
    ixy = ((x * y1 + 2 * x * y + 2 * x1 * y1 + x1 * y) * cross).sum() / (24 * area) - cx * cy
    lam = 0.5 * (ixx + iyy) + math.sqrt(max(0.25 * (ixx - iyy) ** 2 + ixy**2, 0.0))
    return abs(area), 4.0 * math.sqrt(max(lam, 0.0))


def _blob(
    rng: np.random.Generator,
    centre_xy: tuple[float, float],
    major_px: float,
    aspect: float,
    roughness: float,
    n_vertices: int,
) -> np.ndarray:
    """A smooth irregular closed polygon whose ellipse-fit major axis is ``major_px``."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += (
            roughness
            * rng.uniform(0.2, 1.0)
            / (k - 1)
            * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        )
    r = np.maximum(r, 0.35)
    x = r * np.cos(theta) * math.sqrt(aspect)
    y = r * np.sin(theta) / math.sqrt(aspect)
    ang = rng.uniform(0, np.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    xy = np.stack([x * ca - y * sa, x * sa + y * ca], axis=1)
    _, major = _polygon_moments(xy)
    xy *= major_px / major
    return xy + np.asarray(centre_xy, dtype=np.float64)


# -- coarse fields -------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return f / max(float(f.std()), 1e-9)


def _coarse_xy(cell_px: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 pixel coordinates of the coarse cell centres (x row vector, y column vector)."""
    ny, nx = shape
    return (np.arange(nx) + 0.5) * cell_px, ((np.arange(ny) + 0.5) * cell_px)[:, None]


def _piece_field(rng, cx, cy, a, b, xs, ys) -> np.ndarray:
    """``(r(theta) - rho) * b``: about the signed distance (px, > 0 inside) to an irregular ellipse."""
    ang = rng.uniform(-0.3, 0.3)
    ca, sa = math.cos(ang), math.sin(ang)
    dx, dy = xs - cx, ys - cy
    u = (dx * ca + dy * sa) / a
    v = (-dx * sa + dy * ca) / b
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0.0, 0.14) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (r - rho) * min(a, b)


def _slots(rng: np.random.Generator, w: int, h: int, n: int) -> list[tuple[float, ...]]:
    """Split the slide into ``n`` rectangles ``(x0, y0, x1, y1)``, one per tissue piece."""
    swap = h > w
    lw, lh = (h, w) if swap else (w, h)
    if n == 4 and rng.random() < 0.6:
        fx, fy = rng.uniform(0.42, 0.58, 2)
        rects = [
            (0, 0, fx * lw, fy * lh),
            (fx * lw, 0, lw, fy * lh),
            (0, fy * lh, fx * lw, lh),
            (fx * lw, fy * lh, lw, lh),
        ]
    elif n == 3 and rng.random() < 0.5:
        fx, fy = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.6)
        rects = [(0, 0, fx * lw, lh), (fx * lw, 0, lw, fy * lh), (fx * lw, fy * lh, lw, lh)]
    else:
        cuts = np.concatenate([[0.0], np.cumsum(rng.dirichlet(np.full(n, 6.0)))])
        cuts[-1] = 1.0
        rects = [(cuts[i] * lw, 0, cuts[i + 1] * lw, lh) for i in range(n)]
    if swap:
        rects = [(y0, x0, y1, x1) for x0, y0, x1, y1 in rects]
    return rects


def _plan_tissue(rng: np.random.Generator, w: int, h: int, cell_px: float, mpp: float):
    """Tissue pieces as a coarse signed distance to the tissue border in um (> 0 inside).

    Returns ``(sd_um, pieces, fraction)``: 2-4 irregular pieces (one per slot of the slide) with
    ragged borders and a few holes, apart from each other and from the slide edge.
    """
    cell_um = cell_px * mpp
    ny, nx = math.ceil(h / cell_px), math.ceil(w / cell_px)
    xs, ys = _coarse_xy(cell_px, (ny, nx))
    n_pieces = int(rng.integers(2, 5))
    gap_px = 120.0 / mpp
    sd_px = np.full((ny, nx), -1e6)
    for x0, y0, x1, y1 in _slots(rng, w, h, n_pieces):
        sw, sh = x1 - x0, y1 - y0
        a = rng.uniform(0.32, 0.42) * sw
        b = rng.uniform(0.32, 0.42) * sh
        cx = (x0 + x1) / 2 + rng.uniform(-0.06, 0.06) * sw
        cy = (y0 + y1) / 2 + rng.uniform(-0.06, 0.06) * sh
        f = _piece_field(rng, cx, cy, a, b, xs, ys)
        to_slot_edge = np.minimum(np.minimum(xs - x0, x1 - xs), np.minimum(ys - y0, y1 - ys))
        f = np.minimum(f, to_slot_edge - gap_px)
        sd_px = np.maximum(sd_px, f)
    # to micrometres: normalise by the gradient near borders
    gy, gx = np.gradient(sd_px / cell_px)
    grad = np.clip(np.hypot(gx, gy), 0.5, 2.0)
    sd_um = np.clip(sd_px / grad * mpp, -3000.0, 3000.0)
    # ragged borders: smooth noise in um at two scales
    sd_um += 35.0 * _smooth_noise(rng, sd_um.shape, 90.0 / cell_um)
    sd_um += 12.0 * _smooth_noise(rng, sd_um.shape, 30.0 / cell_um)
    # a few holes (fat, sinuses)
    cand = np.flatnonzero(sd_um > 300.0)
    n_holes = int(rng.integers(0, n_pieces + 2)) if cand.size else 0
    iy, ix = np.mgrid[0:ny, 0:nx]
    for _ in range(n_holes):
        hy, hx = divmod(int(cand[rng.integers(cand.size)]), nx)
        dist_um = np.hypot(iy - hy, ix - hx) * cell_um
        sd_um = np.minimum(sd_um, dist_um - rng.uniform(30.0, 100.0))
    # never closer than 60 um to the slide edge
    edge_um = np.minimum(np.minimum(xs, w - xs), np.minimum(ys, h - ys)) * mpp
    sd_um = np.minimum(sd_um, edge_um - 60.0)
    inside = sd_um > 0
    sizes_um2 = np.bincount(measure.label(inside, connectivity=2).ravel())[1:] * cell_um**2
    return sd_um.astype(np.float32), int((sizes_um2 > 0.05e6).sum()), float(inside.mean())


def _coarse_raster(xy: np.ndarray, cell_px: float, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    fill_polygon(mask, xy, (0.0, 0.0), scale=cell_px)
    if not mask.any():  # tiny polygon: mark the cell holding its centroid
        cx, cy = xy.mean(axis=0)
        i = min(max(int(cy // cell_px), 0), shape[0] - 1)
        j = min(max(int(cx // cell_px), 0), shape[1] - 1)
        mask[i, j] = True
    return mask


def _clip_to_tissue(
    xy: np.ndarray, sd_um: np.ndarray, cell_px: float, mpp: float, grid_um: float = 4.0
) -> np.ndarray | None:
    """The part of polygon ``xy`` on tissue, traced on a ``grid_um`` grid (largest piece)."""
    g = grid_um / mpp
    x0, y0 = xy.min(axis=0) - 2 * g
    x1, y1 = xy.max(axis=0) + 2 * g
    nx, ny = math.ceil((x1 - x0) / g), math.ceil((y1 - y0) / g)
    poly = np.zeros((ny, nx), dtype=bool)
    fill_polygon(poly, xy, (x0, y0), scale=g)
    cx = (x0 + (np.arange(nx) + 0.5) * g) / cell_px - 0.5
    cy = (y0 + (np.arange(ny) + 0.5) * g) / cell_px - 0.5
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    tissue = ndimage.map_coordinates(sd_um, [yy, xx], order=1, mode="nearest") > 0
    labels = measure.label(poly & tissue, connectivity=1)
    if labels.max() == 0:
        return None
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    contours = measure.find_contours(np.pad(largest, 1).astype(np.float32), 0.5)
    contour = max(contours, key=len)
    contour = measure.approximate_polygon(contour, tolerance=0.7)[:-1]  # drop the repeated end
    if len(contour) < 3:
        return None
    out = np.empty((len(contour), 2))
    out[:, 0] = x0 + (contour[:, 1] - 1 + 0.5) * g
    out[:, 1] = y0 + (contour[:, 0] - 1 + 0.5) * g
    return out


def _n_vertices(major_px: float, mpp: float) -> int:
    return int(np.clip(major_px * mpp * math.pi / 12.0, 24, 360))


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> int | None:
    idx = np.flatnonzero(candidates)
    return int(idx[rng.integers(idx.size)]) if idx.size else None


def plan_slide(
    slide_id: str,
    label: str,
    seed: int,
    width_px: int,
    height_px: int,
    mpp: float,
    size_jitter: float = SETTINGS["demo.size_jitter"].default,
    centre: str = "",
) -> SlidePlan:
    """Plan one synthetic slide (no pixels yet): deterministic from ``(seed, slide_id)``.

    ``width_px``/``height_px`` are level-0 sizes around which the slide varies by
    ``+-size_jitter`` (then made odd, so no level is an exact halving); ``mpp`` in um/px.
    ``label`` is ``tumor`` (lesions planned) or ``normal``. ``centre`` (a key of
    :data:`DEMO_CENTRES`, or empty) sets the stain and the scanner; the rest of the plan does not
    depend on it.
    """
    try:
        check_slide_id(slide_id)
    except ValueError as exc:
        raise ConfigError(f"synth: {exc}")
    if label not in ("tumor", "normal"):
        raise ConfigError(f"synth {slide_id}: label must be 'tumor' or 'normal', got {label!r}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"synth {slide_id}: mpp must be positive, got {mpp}")
    if not 0 <= size_jitter < 1:
        raise ConfigError(f"synth {slide_id}: size jitter must be in [0, 1), got {size_jitter}")
    lab = demo_centre(centre, slide_id)
    s_int = slide_seed(seed, slide_id)
    rng = np.random.default_rng([s_int, 0])
    w, h = int(width_px), int(height_px)
    if size_jitter > 0:
        w = round(w * (1 + rng.uniform(-size_jitter, size_jitter))) | 1
        h = round(h * (1 + rng.uniform(-size_jitter, size_jitter))) | 1
    min_side_um = 800.0
    if min(w, h) * mpp < min_side_um:
        raise ConfigError(
            f"synth {slide_id}: {w}x{h} px at {mpp} um/px is smaller than {min_side_um:g} um a side"
        )
    cell_um = FIELD_CELL_UM
    cell_px = cell_um / mpp
    sd_um, pieces, fraction = _plan_tissue(rng, w, h, cell_px, mpp)
    shape = sd_um.shape
    inside = sd_um > 0
    dist_in = ndimage.distance_transform_edt(inside) * cell_um
    dist_out = ndimage.distance_transform_edt(~inside) * cell_um

    plan = SlidePlan(
        slide_id=slide_id,
        label=label,
        seed=int(seed),
        seed_int=s_int,
        width_px=w,
        height_px=h,
        mpp=float(mpp),
        cell_px=cell_px,
        sd_um=sd_um,
        density=np.clip(0.8 + 0.16 * _smooth_noise(rng, shape, 120.0 / cell_um), 0.45, 1.0).astype(
            np.float32
        ),
        stain=np.clip(1.0 + 0.08 * _smooth_noise(rng, shape, 200.0 / cell_um), 0.8, 1.2).astype(
            np.float32
        ),
        fibre_mix=(1.0 / (1.0 + np.exp(-2.5 * _smooth_noise(rng, shape, 150.0 / cell_um)))).astype(
            np.float32
        ),
        tissue_pieces=pieces,
        tissue_fraction=fraction,
    )
    # slide-level stain and scanner variation around the centre's (the same draws in every centre)
    h_od = np.asarray(lab.h_od) * lab.h_amount * rng.uniform(0.92, 1.08) + rng.normal(0, 0.02, 3)
    e_od = np.asarray(lab.e_od) * lab.e_amount * rng.uniform(0.88, 1.12) + rng.normal(0, 0.02, 3)
    plan.h_od = np.clip(h_od, 0.01, None)
    plan.e_od = np.clip(e_od, 0.01, None)
    plan.background_rgb = np.array(lab.white_rgb) + rng.uniform(-3, 2, 3)
    plan.centre = lab.name
    plan.blur_px = lab.blur_um / plan.mpp
    plan.noise_od = lab.noise_od
    plan.jpeg_quality = lab.jpeg_quality
    plan.fibre_angles = (float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi)))

    occupied = np.zeros(shape, dtype=bool)
    if label == "tumor":
        _plan_lesions(rng, plan, dist_in, occupied)
    _plan_mimics(rng, plan, dist_in, occupied)
    _plan_artefacts(rng, plan, dist_out)
    return plan


def _plan_lesions(rng, plan: SlidePlan, dist_in: np.ndarray, occupied: np.ndarray) -> None:
    """Macro, micro and ITC-sized lesions, maybe one on the tissue border, maybe an exclusion."""
    mpp, cell_px, shape = plan.mpp, plan.cell_px, plan.sd_um.shape
    group = str(rng.choice(["Tumor", "Tumor", "_0", "_1"]))
    kinds = ["macro"] if rng.random() < 0.7 else []
    kinds += ["micro"] * int(rng.integers(1, 3) if kinds else rng.integers(1, 4))
    kinds += ["itc"] * int(rng.integers(1, 4))
    big = [i for i, k in enumerate(kinds) if k != "itc"]
    border = int(rng.choice(big)) if rng.random() < 0.5 else -1
    max_major_um = 2 * float(dist_in.max()) * 0.85
    # macro-metastases up to 1.5 mm on demo slides, larger (up to 4 mm) on Camelyon-size ones
    macro_hi = float(np.clip(0.12 * min(plan.width_px, plan.height_px) * mpp, 1500.0, 4000.0))
    for i, kind in enumerate(kinds):
        lo, hi = {"macro": (800.0, macro_hi), "micro": (300.0, 800.0), "itc": (50.0, 150.0)}[kind]
        if kind == "macro" and max_major_um < lo:
            kind, lo, hi = "micro", 300.0, 800.0
        lesion = None
        clear = (
            ndimage.distance_transform_edt(~occupied) * FIELD_CELL_UM if occupied.any() else None
        )
        for attempt in range(60):
            major_um = rng.uniform(lo, min(hi, max(lo, max_major_um)))
            if attempt >= 30:
                major_um = lo + (major_um - lo) * 0.3
            lesion = _try_lesion(rng, plan, kind, group, major_um, i == border, dist_in, clear)
            if lesion is not None:
                break
        if lesion is None:
            log.debug("%s: no room for a %s lesion", plan.slide_id, kind)
            continue
        plan.lesions.append(lesion)
        raster = _coarse_raster(lesion.level0_xy, cell_px, shape)
        grow = max(1, round(250.0 / FIELD_CELL_UM))
        occupied |= ndimage.binary_dilation(raster, iterations=grow)
    if not any(les.kind != "itc" for les in plan.lesions):
        log.warning(
            "%s: tumour slide without a macro/micro lesion (tissue too small)", plan.slide_id
        )
    # an exclusion (_2) inside one large lesion
    large = [les for les in plan.lesions if les.major_axis_um >= 450 and les.kind != "itc"]
    if large and rng.random() < 0.45:
        host = large[int(rng.integers(len(large)))]
        excl = _try_exclusion(rng, host, mpp)
        if excl is not None:
            plan.exclusions.append(excl)


def _try_lesion(rng, plan, kind, group, major_um, on_border, dist_in, clear) -> Lesion | None:
    """One lesion attempt; ``clear`` is the distance (um) to earlier lesions, or None."""
    mpp, cell_px = plan.mpp, plan.cell_px
    shape = plan.sd_um.shape
    major_px = major_um / mpp
    aspect = rng.uniform(1.0, 1.7) if kind != "itc" else rng.uniform(1.0, 1.5)
    roughness = rng.uniform(0.15, 0.35)
    semi_um = major_um / 2
    if on_border:
        ok = (dist_in > 0) & (dist_in <= FIELD_CELL_UM * 1.5)
    else:
        ok = dist_in >= semi_um * 1.05 + 30.0
    if clear is not None:
        ok &= clear >= semi_um + 200.0
    k = _pick(rng, ok)
    if k is None:
        return None
    iy, ix = divmod(k, shape[1])
    cx, cy = (ix + 0.5) * cell_px, (iy + 0.5) * cell_px
    if on_border:  # move inwards along the distance gradient, so the lesion crosses the border
        gy, gx = np.gradient(ndimage.gaussian_filter(dist_in, 1.0))
        norm = math.hypot(gx[iy, ix], gy[iy, ix]) or 1.0
        step = rng.uniform(0.15, 0.4) * major_px / 2
        cx += gx[iy, ix] / norm * step
        cy += gy[iy, ix] / norm * step
    xy = _blob(rng, (cx, cy), major_px, aspect, roughness, _n_vertices(major_px, mpp))
    raster = _coarse_raster(xy, cell_px, shape)
    if clear is not None and (clear[raster] < 150.0).any():
        return None
    if on_border:
        full_area, _ = _polygon_moments(xy)
        clipped = _clip_to_tissue(xy, plan.sd_um, cell_px, mpp)
        if clipped is None:
            return None
        area, major = _polygon_moments(clipped)
        if not (0.5 * full_area <= area <= 0.93 * full_area) or major * mpp < 300.0:
            return None
        xy = clipped
    else:
        if (dist_in[raster] < 20.0).any():
            return None
    area, major = _polygon_moments(xy)
    if kind == "itc" and major * mpp >= 190.0:
        return None
    return Lesion(
        kind=kind,
        group=group,
        level0_xy=xy,
        touches_border=bool(on_border),
        major_axis_um=major * mpp,
        area_um2=area * mpp * mpp,
    )


def _try_exclusion(rng, host: Lesion, mpp: float) -> np.ndarray | None:
    """A small ``_2`` polygon at least 30 um inside ``host``."""
    g = 4.0 / mpp
    x0, y0 = host.level0_xy.min(axis=0) - 2 * g
    x1, y1 = host.level0_xy.max(axis=0) + 2 * g
    grid = np.zeros((math.ceil((y1 - y0) / g), math.ceil((x1 - x0) / g)), dtype=bool)
    fill_polygon(grid, host.level0_xy, (x0, y0), scale=g)
    depth = ndimage.distance_transform_edt(grid) * 4.0
    for _ in range(30):
        d_um = rng.uniform(80.0, min(220.0, 0.35 * host.major_axis_um))
        k = _pick(rng, depth >= d_um / 2 + 40.0)
        if k is None:
            return None
        iy, ix = divmod(k, grid.shape[1])
        centre = (x0 + (ix + 0.5) * g, y0 + (iy + 0.5) * g)
        xy = _blob(rng, centre, d_um / mpp, rng.uniform(1.0, 1.5), 0.2, 32)
        sub = np.zeros_like(grid)
        fill_polygon(sub, xy, (x0, y0), scale=g)
        if sub.any() and (depth[sub] >= 30.0).all():
            return xy
    return None


def _plan_mimics(rng, plan: SlidePlan, dist_in: np.ndarray, occupied: np.ndarray) -> None:
    """Germinal-centre-like clusters of larger, paler round nuclei: on every normal slide (2 or
    more, so a normal slide is never trivially clean) and on most tumour slides."""
    if rng.random() >= 0.7 and plan.label == "tumor":
        return
    tissue_mm2 = plan.tissue_fraction * plan.width_px * plan.height_px * plan.mpp**2 / 1e6
    lo = 2 if plan.label == "normal" else 1
    n = int(rng.integers(lo, lo + 3 + max(1, round(tissue_mm2 / 4))))
    clear = ndimage.distance_transform_edt(~occupied) * FIELD_CELL_UM if occupied.any() else None
    taken = np.zeros_like(occupied)
    for _ in range(n):
        for _attempt in range(20):
            d_um = rng.uniform(150.0, 420.0)
            ok = dist_in >= d_um / 2 + 40.0
            if clear is not None:
                ok &= clear >= d_um / 2 + 150.0
            ok &= ~taken
            k = _pick(rng, ok)
            if k is None:
                break
            iy, ix = divmod(k, dist_in.shape[1])
            centre = ((ix + 0.5) * plan.cell_px, (iy + 0.5) * plan.cell_px)
            xy = _blob(rng, centre, d_um / plan.mpp, rng.uniform(1.0, 1.4), 0.15, 40)
            raster = _coarse_raster(xy, plan.cell_px, dist_in.shape)
            if (dist_in[raster] < 20.0).any() or (taken & raster).any():
                continue
            plan.mimics.append(xy)
            taken |= ndimage.binary_dilation(raster, iterations=3)
            break


def _polyline_polygon(points: np.ndarray, width_px: np.ndarray) -> np.ndarray:
    """A stroke of varying width along a polyline, as one closed polygon."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    left = points + normal * (width_px[:, None] / 2)
    right = points - normal * (width_px[:, None] / 2)
    return np.concatenate([left, right[::-1]], axis=0)


def _plan_artefacts(rng, plan: SlidePlan, dist_out: np.ndarray) -> None:
    """Pen strokes near a slide edge and dust specks/fibres on the background, on some slides."""
    w, h, mpp = plan.width_px, plan.height_px, plan.mpp
    pens = {
        "blue": np.array([1.05, 0.62, 0.18]),
        "green": np.array([0.95, 0.30, 0.80]),
        "black": np.array([1.35, 1.30, 1.22]),
    }
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            colour = str(rng.choice(list(pens)))
            side = int(rng.integers(4))
            along = w if side < 2 else h
            across = h if side < 2 else w
            n = 80
            t = np.linspace(0, 1, n)
            start = rng.uniform(0.05, 0.4) * along
            length = rng.uniform(0.25, 0.55) * along
            a = start + t * length
            off = rng.uniform(0.015, 0.07) * across
            wiggle = (
                rng.uniform(20, 120)
                / mpp
                * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6))
            )
            b = off + wiggle + t * rng.uniform(-0.03, 0.03) * across
            if side in (1, 3):
                b = across - b
            pts = np.stack([a, b], axis=1) if side < 2 else np.stack([b, a], axis=1)
            width = rng.uniform(40, 120) / mpp * (0.8 + 0.2 * np.sin(np.pi * t))
            od = pens[colour] * rng.uniform(0.55, 1.0)
            plan.artefacts.append(Artefact("pen", _polyline_polygon(pts, width), od))
    if rng.random() < 0.6:
        area_mm2 = w * h * mpp**2 / 1e6
        n = int(rng.integers(4, 12 + min(round(area_mm2), 48)))
        bg = dist_out >= 40.0
        for _ in range(n):
            k = _pick(rng, bg)
            if k is None:
                break
            iy, ix = divmod(k, dist_out.shape[1])
            c = np.array([(ix + rng.random()) * plan.cell_px, (iy + rng.random()) * plan.cell_px])
            grey = rng.uniform(0.35, 1.1)
            od = grey * np.array([1.0, 1.05, 1.2]) * rng.uniform(0.9, 1.1, 3)
            if rng.random() < 0.8:
                xy = _blob(rng, c, rng.uniform(5.0, 40.0) / mpp, rng.uniform(1.0, 2.0), 0.5, 16)
            else:
                n_pts = 30
                length = rng.uniform(80.0, 400.0) / mpp
                ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.12, n_pts))
                steps = np.stack([np.cos(ang), np.sin(ang)], axis=1) * (length / n_pts)
                pts = c + np.cumsum(steps, axis=0)
                xy = _polyline_polygon(pts, np.full(n_pts, rng.uniform(2.0, 5.0) / mpp))
                od = od * 0.6
            plan.artefacts.append(Artefact("dust", xy, od))


# -- textures and sprites ------------------------------------------------------------------------
def _periodic_texture(
    rng, period: int, mpp: float, along_um: float, across_um: float, angle: float
) -> np.ndarray:
    """Periodic Gaussian-filtered noise, elongated along ``angle`` (fibres), unit std."""
    f = np.fft.fftfreq(period)[:, None] / mpp  # cycles per um
    g = np.fft.fftfreq(period)[None, :] / mpp
    ca, sa = math.cos(angle), math.sin(angle)
    f_along = g * ca + f * sa
    f_across = -g * sa + f * ca
    filt = np.exp(-2 * (np.pi * f_along * along_um) ** 2 - 2 * (np.pi * f_across * across_um) ** 2)
    spec = np.fft.fft2(rng.standard_normal((period, period))) * filt
    tex = np.real(np.fft.ifft2(spec))
    return ((tex - tex.mean()) / max(float(tex.std()), 1e-9)).astype(np.float32)


class _Periodic:
    """A periodic texture read at any offset as a zero-copy view of a cached tiling."""

    def __init__(self, tex: np.ndarray) -> None:
        self.tex = tex
        self.tiled = tex
        self.period = tex.shape[0]

    def view(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        p = self.period
        ry, rx = y0 % p, x0 % p
        need_y, need_x = ry + h, rx + w
        if need_y > self.tiled.shape[0] or need_x > self.tiled.shape[1]:
            ny = -(-max(need_y, self.tiled.shape[0]) // p)
            nx = -(-max(need_x, self.tiled.shape[1]) // p)
            self.tiled = np.tile(self.tex, (ny, nx))
        return self.tiled[ry : ry + h, rx : rx + w]


def _sprites(rng, kind: NucleusKind, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """``N_SPRITES`` nucleus stamps (haematoxylin and eosin density), each ``S x S`` pixels."""
    r_max = kind.radius_um[1] * math.sqrt(kind.aspect[1]) * (1 + 1.2 * kind.roughness) / mpp
    size = 2 * math.ceil(r_max) + 3
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    hs = np.zeros((N_SPRITES, size, size), np.float32)
    es = np.zeros((N_SPRITES, size, size), np.float32)
    for n in range(N_SPRITES):
        r = rng.uniform(*kind.radius_um) / mpp
        aspect = rng.uniform(*kind.aspect)
        a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
        ang = rng.uniform(0, np.pi)
        dx = xx - c - rng.uniform(-0.5, 0.5)
        dy = yy - c - rng.uniform(-0.5, 0.5)
        u = (dx * math.cos(ang) + dy * math.sin(ang)) / a
        v = (-dx * math.sin(ang) + dy * math.cos(ang)) / b
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        rt = np.ones_like(theta)
        for k in range(2, 6):
            rt += (
                kind.roughness
                * rng.uniform(0, 1)
                / (k - 1)
                * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
            )
        depth = (rt - rho) * b  # ~ pixels inside the membrane
        cover = np.clip(depth / 1.6 + 0.5, 0.0, 1.0)  # soft ~1.6 px edge (optics)
        rim = np.exp(-((np.maximum(depth, 0) / (kind.rim_um / mpp)) ** 2))
        h_in = rng.uniform(*kind.h_inside)
        speck = ndimage.gaussian_filter(
            rng.standard_normal((size, size)), kind.speckle_um / mpp, mode="wrap"
        )
        speck /= max(float(speck.std()), 1e-9)
        hval = h_in + (kind.h_rim - h_in) * rim + kind.speckle * h_in * speck
        eval_ = np.full_like(hval, 0.08)
        for _ in range(int(rng.integers(kind.nucleoli[0], kind.nucleoli[1] + 1))):
            t = rng.uniform(0, 2 * np.pi)
            rr = rng.uniform(0.0, 0.5)
            ny_ = c + rr * b * math.sin(t)
            nx_ = c + rr * a * math.cos(t)
            blob = np.exp(
                -((yy - ny_) ** 2 + (xx - nx_) ** 2) / (2 * (kind.nucleolus_um / mpp) ** 2)
            )
            hval = hval + 0.7 * blob
            eval_ = eval_ + 0.5 * blob
        hs[n] = (cover * np.maximum(hval, 0.05)).astype(np.float32)
        es[n] = (cover * eval_).astype(np.float32)
    return hs, es


# -- rendering -----------------------------------------------------------------------------------
_LATTICE_BLOCK = 30  # lattice points per block side (a multiple of every parity modulus)


class SlideRenderer:
    """Renders any level-0 region of a :class:`SlidePlan`; pixels depend only on position."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        rng = np.random.default_rng([plan.seed_int, 1])
        mpp = plan.mpp
        self.fibres = [
            _Periodic(_periodic_texture(rng, TEXTURE_PERIOD_PX, mpp, 9.0, 0.8, ang))
            for ang in plan.fibre_angles
        ]
        self.edge = _Periodic(_periodic_texture(rng, TEXTURE_PERIOD_PX, mpp, 3.0, 3.0, 0.0))
        self.blotch = _Periodic(BLOTCH_AMP * self.edge.tex)
        noise = plan.noise_od * rng.standard_normal((NOISE_PERIOD_PX, NOISE_PERIOD_PX))
        self.noise = _Periodic(noise.astype(np.float32))
        self.background = plan.background_rgb.astype(np.float32)[:, None, None]
        # the scanner's optics: a Gaussian blur, computed on a margin wide enough that every
        # output pixel sees all of its kernel (so regions still tile seamlessly)
        self.blur_margin = int(4.0 * plan.blur_px + 0.5) + 1 if plan.blur_px > 0 else 0
        self.sprites = {k.name: _sprites(rng, k, mpp) for k in KINDS}
        self.spacing_px = {k.name: k.spacing_um / mpp for k in KINDS}
        self.pad = max(s[0].shape[1] for s in self.sprites.values()) // 2 + 1
        self.modulus = {}
        for k in KINDS:
            size = self.sprites[k.name][0].shape[1]
            m = 2
            while (m - 2 * k.jitter) * self.spacing_px[k.name] < size:
                m += 1
            if _LATTICE_BLOCK % m:
                m = next(d for d in range(m, _LATTICE_BLOCK + 1) if _LATTICE_BLOCK % d == 0)
            self.modulus[k.name] = m
        self._bboxes = {
            "lesion": [(les.level0_xy.min(0), les.level0_xy.max(0)) for les in plan.lesions],
            "exclusion": [(xy.min(0), xy.max(0)) for xy in plan.exclusions],
            "mimic": [(xy.min(0), xy.max(0)) for xy in plan.mimics],
            "artefact": [(a.level0_xy.min(0), a.level0_xy.max(0)) for a in plan.artefacts],
        }

    # fields ----------------------------------------------------------------------------------
    def _interp_weights(self, start: int, n: int, size: int):
        """Indices and weights of bilinear interpolation of coarse samples along one axis."""
        u = (np.arange(start, start + n) + 0.5) / self.plan.cell_px - 0.5
        i0 = np.floor(u).astype(np.int64)
        t = (u - i0).astype(np.float32)
        return np.clip(i0, 0, size - 1), np.clip(i0 + 1, 0, size - 1), t

    def _field(self, f: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Bilinear upsampling of a coarse field to level-0 pixels (exact per pixel)."""
        ix0, ix1, tx = self._interp_weights(x0, w, f.shape[1])
        iy0, iy1, ty = self._interp_weights(y0, h, f.shape[0])
        rows = np.unique(np.concatenate([iy0, iy1]))
        pos = np.searchsorted(rows, iy0), np.searchsorted(rows, iy1)
        sub = f[rows]
        gx = sub[:, ix0] * (1 - tx) + sub[:, ix1] * tx  # (rows, w)
        return gx[pos[0]] * (1 - ty)[:, None] + gx[pos[1]] * ty[:, None]

    def _field_blocky(self, f: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """A slowly varying coarse field, sampled on a fixed 8-pixel grid and repeated."""
        b = 8
        bx0, by0 = x0 // b, y0 // b
        nbx, nby = (x0 + w - 1) // b - bx0 + 1, (y0 + h - 1) // b - by0 + 1
        cp = self.plan.cell_px
        xs = ((bx0 + np.arange(nbx)) * b + b / 2) / cp - 0.5
        ys = ((by0 + np.arange(nby)) * b + b / 2) / cp - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        small = ndimage.map_coordinates(f, [yy, xx], order=1, mode="nearest").astype(np.float32)
        big = np.repeat(np.repeat(small, b, axis=0), b, axis=1)
        return big[y0 - by0 * b : y0 - by0 * b + h, x0 - bx0 * b : x0 - bx0 * b + w].copy()

    def _coarse_points(self, f: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cp = self.plan.cell_px
        return ndimage.map_coordinates(f, [y / cp - 0.5, x / cp - 0.5], order=1, mode="nearest")

    def _hits(self, key: str, x0: float, y0: float, x1: float, y1: float) -> list[int]:
        return [
            i
            for i, (lo, hi) in enumerate(self._bboxes[key])
            if hi[0] >= x0 and lo[0] <= x1 and hi[1] >= y0 and lo[1] <= y1
        ]

    # nuclei ----------------------------------------------------------------------------------
    def _lattice(self, kind: NucleusKind, x0: int, y0: int, x1: int, y1: int):
        """Candidate nuclei of ``kind`` with centres in ``[x0, x1) x [y0, y1)``."""
        s = self.spacing_px[kind.name]
        span = _LATTICE_BLOCK * s
        kid = KINDS.index(kind)
        parts = []
        off = 1 << 20  # keep seed words non-negative
        for by in range(math.floor(y0 / span), math.floor((y1 - 1) / span) + 1):
            for bx in range(math.floor(x0 / span), math.floor((x1 - 1) / span) + 1):
                rng = np.random.default_rng([self.plan.seed_int, 2, kid, by + off, bx + off])
                n = _LATTICE_BLOCK * _LATTICE_BLOCK
                jj = np.tile(np.arange(_LATTICE_BLOCK), _LATTICE_BLOCK)
                ii = np.repeat(np.arange(_LATTICE_BLOCK), _LATTICE_BLOCK)
                jit = rng.uniform(-kind.jitter, kind.jitter, (2, n))
                x = (bx * _LATTICE_BLOCK + jj + 0.5 + jit[0]) * s
                y = (by * _LATTICE_BLOCK + ii + 0.5 + jit[1]) * s
                variant = rng.integers(0, N_SPRITES, n)
                u = rng.random((2, n))
                m = self.modulus[kind.name]
                parity = (ii % m) * m + (jj % m)
                sel = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
                parts.append((x[sel], y[sel], variant[sel], u[0][sel], u[1][sel], parity[sel]))
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def _stamp(self, canvas_h, canvas_e, kind, cx, cy, variant, parity, ox, oy) -> None:
        """Draw nuclei (max-combined) into canvases whose origin is level-0 ``(ox, oy)``."""
        sh, se = self.sprites[kind.name]
        size = sh.shape[1]
        wc = canvas_h.shape[1]
        top = np.floor(cy).astype(np.int64) - size // 2 - oy
        left = np.floor(cx).astype(np.int64) - size // 2 - ox
        offs = (np.arange(size)[:, None] * wc + np.arange(size)[None, :]).ravel()
        base = top * wc + left
        fh, fe = canvas_h.reshape(-1), canvas_e.reshape(-1)
        for p in np.unique(parity):  # positions within one parity class never overlap
            sel = parity == p
            idx = base[sel][:, None] + offs[None, :]
            fh[idx] = np.maximum(fh[idx], sh[variant[sel]].reshape(idx.shape))
            fe[idx] = np.maximum(fe[idx], se[variant[sel]].reshape(idx.shape))

    # masks -----------------------------------------------------------------------------------
    def _masks(self, x0: int, y0: int, w: int, h: int, sd: np.ndarray):
        """Tissue, tumour and mimic masks of a region (pixel centres)."""
        tissue = (sd + EDGE_NOISE_UM * self.edge.view(y0, x0, h, w)) > 0
        tumour = np.zeros((h, w), dtype=bool)
        mimic = np.zeros((h, w), dtype=bool)
        box = (x0, y0, x0 + w, y0 + h)
        for i in self._hits("lesion", *box):
            fill_polygon(tumour, self.plan.lesions[i].level0_xy, (x0, y0))
        if tumour.any():
            for i in self._hits("exclusion", *box):
                fill_polygon(tumour, self.plan.exclusions[i], (x0, y0), value=False)
        tumour &= tissue
        for i in self._hits("mimic", *box):
            fill_polygon(mimic, self.plan.mimics[i], (x0, y0))
        mimic &= tissue & ~tumour
        return tissue, tumour, mimic

    def masks(self, level0_xy: tuple[int, int], size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Bool ``(h, w)`` masks of a level-0 region: ``tissue``, ``tumour`` (what the annotations
        describe: inside a tumour polygon, outside every ``_2`` polygon, on tissue) and ``mimic``."""
        x0, y0 = (int(v) for v in level0_xy)
        w, h = (int(v) for v in size)
        sd = self._field(self.plan.sd_um, x0, y0, w, h)
        tissue, tumour, mimic = self._masks(x0, y0, w, h, sd)
        return {"tissue": tissue, "tumour": tumour, "mimic": mimic}

    # pixels ----------------------------------------------------------------------------------
    def render(self, level0_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the level-0 region at ``level0_xy`` of ``size = (w, h)``."""
        x0, y0 = (int(v) for v in level0_xy)
        w, h = (int(v) for v in size)
        m = self.blur_margin
        light = self._light(x0 - m, y0 - m, w + 2 * m, h + 2 * m)
        if m:
            sigma = self.plan.blur_px
            for axis in (1, 2):
                light = ndimage.gaussian_filter1d(light, sigma, axis=axis, truncate=4.0)
            light = light[:, m : m + h, m : m + w]
        light += 0.5
        np.minimum(light, 255.0, out=light)
        return np.ascontiguousarray(light.astype(np.uint8).transpose(1, 2, 0))

    def _light(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Transmitted light ``(3, h, w)`` float32 of a level-0 region (before the optics)."""
        plan = self.plan
        p = self.pad
        od = np.empty((3, h, w), np.float32)
        for c in range(3):  # per-channel pixel noise: the same texture at shifted positions
            od[c] = self.noise.view(y0 + 131 * c, x0 + 71 * c, h, w)
        # coarse test: is there anything but glass here?
        cp = plan.cell_px
        ry0 = max(0, int((y0 - p) / cp) - 1)
        ry1 = min(plan.sd_um.shape[0], int((y0 + h + p) / cp) + 2)
        rx0 = max(0, int((x0 - p) / cp) - 1)
        rx1 = min(plan.sd_um.shape[1], int((x0 + w + p) / cp) + 2)
        sd_box = plan.sd_um[ry0:ry1, rx0:rx1]
        has_tissue = sd_box.size > 0 and float(sd_box.max()) > -(EDGE_NOISE_UM * 6 + cp * plan.mpp)
        if has_tissue:
            self._render_tissue(od, x0, y0, w, h)
        for i in self._hits("artefact", x0, y0, x0 + w, y0 + h):
            art = plan.artefacts[i]
            m = np.zeros((h, w), dtype=bool)
            fill_polygon(m, art.level0_xy, (x0, y0))
            if m.any():
                streak = 1.0 + 0.15 * self.fibres[0].view(y0, x0, h, w)[m]
                for c in range(3):
                    od[c][m] += art.od_rgb[c] * streak
        # Beer-Lambert: background light attenuated by exp(-od), rounded to uint8
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= self.background
        return od

    def _render_tissue(self, od: np.ndarray, x0: int, y0: int, w: int, h: int) -> None:
        """Add stroma and nuclei optical densities of a region to ``od``."""
        plan = self.plan
        p = self.pad
        # look-up region (centres of nuclei that reach the output) and stamp canvas
        lx0, ly0, lw, lh = x0 - p, y0 - p, w + 2 * p, h + 2 * p
        sd = self._field(plan.sd_um, lx0, ly0, lw, lh)
        tissue, tumour, mimic = self._masks(lx0, ly0, lw, lh, sd)
        canvas_h = np.zeros((h + 4 * p, w + 4 * p), np.float32)
        canvas_e = np.zeros_like(canvas_h)
        if tissue.any():
            for kind in KINDS:
                x, y, variant, u1, u2, parity = self._lattice(kind, lx0, ly0, lx0 + lw, ly0 + lh)
                if x.size == 0:
                    continue
                iy = np.floor(y).astype(np.int64) - ly0
                ix = np.floor(x).astype(np.int64) - lx0
                t_, tu, mi = tissue[iy, ix], tumour[iy, ix], mimic[iy, ix]
                if kind is LYMPHOCYTE:
                    dens = self._coarse_points(plan.density, x, y)
                    keep = t_ & ~tu & (~mi | (u1 < GC_LYMPHOCYTES)) & (u2 < dens)
                    keep |= tu & (u1 < TIL_FRACTION)
                elif kind is TUMOUR:
                    keep = tu & (u1 < TUMOUR_FILL)
                else:
                    keep = (mi & (u1 < MIMIC_FILL)) | (t_ & ~tu & ~mi & (u1 < HISTIOCYTE_FRACTION))
                if keep.any():
                    self._stamp(
                        canvas_h,
                        canvas_e,
                        kind,
                        x[keep],
                        y[keep],
                        variant[keep],
                        parity[keep],
                        x0 - 2 * p,
                        y0 - 2 * p,
                    )
        crop = (slice(p, p + h), slice(p, p + w))
        t = tissue[crop].astype(np.float32)
        tu = tumour[crop].astype(np.float32)
        stain = self._field_blocky(plan.stain, x0, y0, w, h)
        stain *= t
        mix = self._field_blocky(plan.fibre_mix, x0, y0, w, h)
        f0, f1 = self.fibres[0].view(y0, x0, h, w), self.fibres[1].view(y0, x0, h, w)
        fibre = f1 - f0
        fibre *= mix
        fibre += f0  # mix * f1 + (1 - mix) * f0
        fibre *= FIBRE_AMP * (1 - (1 - TUMOUR_FIBRE_FACTOR) * tu)
        fibre += self.blotch.view(y0 + 97, x0 + 193, h, w)
        fibre += 1.0
        e = np.maximum(fibre, 0.05, out=fibre)
        e *= stain
        e *= STROMA_E * (1 - (1 - TUMOUR_E_FACTOR) * tu)
        e += canvas_e[2 * p : 2 * p + h, 2 * p : 2 * p + w]
        tu *= TUMOUR_H_ADD
        tu += STROMA_H
        hh = np.multiply(stain, tu, out=stain)
        hh += canvas_h[2 * p : 2 * p + h, 2 * p : 2 * p + w]
        tmp = t
        for c in range(3):
            np.multiply(hh, np.float32(plan.h_od[c]), out=tmp)
            od[c] += tmp
            np.multiply(e, np.float32(plan.e_od[c]), out=tmp)
            od[c] += tmp


# -- pyramid writer ------------------------------------------------------------------------------
def _encode_tile(tile: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    if tile.shape[0] != TILE_PX or tile.shape[1] != TILE_PX:
        full = np.full((TILE_PX, TILE_PX, 3), 255, np.uint8)
        full[: tile.shape[0], : tile.shape[1]] = tile
        tile = full
    return imagecodecs.jpeg8_encode(
        tile,
        level=quality,
        colorspace="RGB",
        outcolorspace="YCBCR",
        subsampling=JPEG_SUBSAMPLING,
    )


def _encode_row(strip: np.ndarray, quality: int = JPEG_QUALITY) -> list[bytes]:
    """JPEG tiles of one tile row (``<= TILE_PX`` rows), left to right."""
    return [
        _encode_tile(strip[:, x : x + TILE_PX], quality) for x in range(0, strip.shape[1], TILE_PX)
    ]


def _halve(strip: np.ndarray, out_w: int) -> np.ndarray:
    """2x2 mean (rounded) of an RGB strip, edge-replicated to ``2*out_w`` columns and even rows."""
    h, w = strip.shape[:2]
    pad_h, pad_w = h % 2, 2 * out_w - w
    if pad_h or pad_w:
        strip = np.pad(strip, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rows = strip[0::2].astype(np.uint16)
    rows += strip[1::2]
    pairs = rows.reshape(rows.shape[0], out_w, 2, 3)
    q = pairs[:, :, 0] + pairs[:, :, 1]
    q += 2
    q >>= 2
    return q.astype(np.uint8)


class _LevelSink:
    """Collects rows of one reduced level, spools its JPEG tile rows, and feeds the next level."""

    def __init__(
        self, size: tuple[int, int], spool, nxt: _LevelSink | None, quality: int = JPEG_QUALITY
    ) -> None:
        self.w, self.h = size
        self.quality = quality
        self.spool = spool
        self.next = nxt
        self.buf = np.empty((TILE_PX, self.w, 3), np.uint8)
        self.fill = 0
        self.rows_done = 0
        self.tiles: list[tuple[int, int]] = []  # (offset, length) in the spool

    def push(self, rows: np.ndarray) -> None:
        while rows.shape[0]:
            take = min(TILE_PX - self.fill, rows.shape[0])
            self.buf[self.fill : self.fill + take] = rows[:take]
            self.fill += take
            rows = rows[take:]
            if self.fill == TILE_PX or self.rows_done + self.fill == self.h:
                self._flush()

    def _flush(self) -> None:
        strip = self.buf[: self.fill]
        for data in _encode_row(strip, self.quality):
            self.tiles.append((self.spool.tell(), len(data)))
            self.spool.write(data)
        if self.next is not None:
            self.next.push(_halve(strip, self.next.w))
        self.rows_done += self.fill
        self.fill = 0

    def read_tiles(self) -> Iterator[bytes]:
        for offset, length in self.tiles:
            self.spool.seek(offset)
            yield self.spool.read(length)


def write_pyramid(
    renderer: SlideRenderer, out: Path, workers: int = 1, progress: bool | None = False
) -> int:
    """Stream ``renderer``'s slide into a pyramidal tiled JPEG TIFF at ``out``; returns its bytes.

    Level 0 is rendered strip by strip (``workers`` threads render and encode strips ahead);
    each strip is also halved into the next level, whose JPEG tiles wait in a temporary file
    until its page is written. Memory stays bounded by the slide width.
    """
    plan = renderer.plan
    sizes = plan.level_sizes()
    w0, h0 = sizes[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bigtiff = w0 * h0 * 3 > 2**31
    description = f"wsiscan synthetic slide {plan.slide_id} (seed {plan.seed})"

    def render_strip(y: int) -> tuple[np.ndarray | None, list[bytes]]:
        """Level-0 rows ``y..y+STRIP_PX``: their JPEG tiles and their 2x2 mean (level 1)."""
        rows = min(STRIP_PX, h0 - y)
        half = np.empty(((rows + 1) // 2, sizes[1][0], 3), np.uint8) if len(sizes) > 1 else None
        tile_rows: list[list[bytes]] = [[] for _ in range(0, rows, TILE_PX)]
        for x in range(0, w0, CHUNK_PX):  # chunk by chunk: never the whole strip in memory
            cw = min(CHUNK_PX, w0 - x)
            pixels = renderer.render((x, y), (cw, rows))
            for i, r in enumerate(range(0, rows, TILE_PX)):
                tile_rows[i].extend(_encode_row(pixels[r : r + TILE_PX], plan.jpeg_quality))
            if half is not None:
                half[:, x // 2 : x // 2 + (cw + 1) // 2] = _halve(pixels, (cw + 1) // 2)
        return half, [tile for row in tile_rows for tile in row]

    with tempfile.TemporaryFile(dir=out.parent, prefix=".synth-spool-") as spool:
        sinks: list[_LevelSink] = []
        nxt = None
        for size in reversed(sizes[1:]):
            nxt = _LevelSink(size, spool, nxt, plan.jpeg_quality)
            sinks.insert(0, nxt)
        first = sinks[0] if sinks else None
        strips = range(0, h0, STRIP_PX)

        def level0_tiles() -> Iterator[bytes]:
            bar = tqdm(
                total=len(strips),
                desc=f"synth {plan.slide_id}",
                unit="strip",
                disable=True if progress is False else (None if progress is None else False),
            )
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                pending: deque[Future] = deque()
                it = iter(strips)
                for y in it:  # keep workers + 1 strips in flight
                    pending.append(pool.submit(render_strip, y))
                    if len(pending) > max(1, workers):
                        break
                while pending:
                    half, tiles = pending.popleft().result()
                    nxt_y = next(it, None)
                    if nxt_y is not None:
                        pending.append(pool.submit(render_strip, nxt_y))
                    if first is not None:
                        first.push(half)
                    del half
                    bar.update(1)
                    yield from tiles
            bar.close()

        def gen_page(level: int) -> Iterator[bytes]:
            return level0_tiles() if level == 0 else sinks[level - 1].read_tiles()

        with atomic_write(out) as fh:
            write_pages(fh, sizes, gen_page, plan.mpp, bigtiff, description, plan.jpeg_quality)
    return out.stat().st_size


def write_pages(
    out: Any,
    sizes,
    gen_page,
    mpp: float,
    bigtiff: bool,
    description: str,
    quality: int = JPEG_QUALITY,
) -> None:
    """One tiled JPEG page per level (pre-encoded tiles), resolution tags in pixels per cm."""
    w0, h0 = sizes[0]
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tif:
        for level, (w, h) in enumerate(sizes):
            res = 1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h)  # pixels per cm
            tif.write(
                data=gen_page(level),
                shape=(h, w, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": quality},
                subsampling=JPEG_SUBSAMPLING,
                resolution=res,
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=description if level == 0 else None,
                software="wsiscan",
                metadata=None,
                maxworkers=1,
            )


# -- public entry points -------------------------------------------------------------------------
def summarize(plan: SlidePlan) -> dict:
    """A JSON-friendly summary of a plan: sizes, tissue, lesions, mimics and artefacts."""
    return {
        "slide_id": plan.slide_id,
        "label": plan.label,
        "centre": plan.centre,
        "seed": plan.seed,
        "width_px": plan.width_px,
        "height_px": plan.height_px,
        "mpp": plan.mpp,
        "levels": [list(s) for s in plan.level_sizes()],
        "tissue_pieces": plan.tissue_pieces,
        "tissue_fraction": round(plan.tissue_fraction, 4),
        "lesions": [
            {
                "kind": les.kind,
                "group": les.group,
                "major_axis_um": round(les.major_axis_um, 1),
                "area_um2": round(les.area_um2, 1),
                "touches_border": les.touches_border,
                "centroid_level0_xy": [round(float(v), 1) for v in les.level0_xy.mean(axis=0)],
            }
            for les in plan.lesions
        ],
        "exclusions": len(plan.exclusions),
        "mimics": len(plan.mimics),
        "pen_marks": sum(a.kind == "pen" for a in plan.artefacts),
        "dust_specks": sum(a.kind == "dust" for a in plan.artefacts),
        "wsiscan_version": __version__,
    }


def synth_slide(
    out_slide: str | Path,
    out_xml: str | Path,
    params: SynthSlideParams,
    *,
    slide_id: str,
    label: str,
    centre: str = "",
    progress: bool | None = False,
) -> dict:
    """Stage ``synth_slide``: one synthetic slide (pyramidal TIFF) and its ASAP XML; returns a
    summary. ``centre``: the slide's demo centre (:data:`DEMO_CENTRES`; empty: none).

    Deterministic: the same arguments give byte-identical files. The level-0 size varies by
    ``+-size_jitter`` around ``width_px x height_px`` (``size_jitter=0`` keeps it exact); ``mpp``
    is the level-0 resolution in um/px; the cohort ``seed`` is mixed with ``slide_id``. Normal
    slides get an XML with no annotations.
    """
    p = params
    t0 = time.perf_counter()
    plan = plan_slide(
        slide_id, label, p.seed, p.width_px, p.height_px, p.mpp, size_jitter=p.size_jitter,
        centre=centre,
    )  # fmt: skip
    t_plan = time.perf_counter() - t0
    file_bytes = write_pyramid(
        SlideRenderer(plan), Path(out_slide), workers=p.workers, progress=progress
    )
    write_asap_xml(out_xml, plan.annotations())
    summary = summarize(plan)
    summary.update(
        plan_s=round(t_plan, 3), write_s=round(time.perf_counter() - t0, 3), file_bytes=file_bytes
    )
    log.info(
        "%s: %s %dx%d px at %.3g um/px, %d level(s), %d tissue piece(s) (%.0f%%), "
        "lesions %s, %d exclusion(s), %d mimic(s), %d pen, %d dust; %.1f MB in %.1f s",
        slide_id,
        label,
        plan.width_px,
        plan.height_px,
        plan.mpp,
        len(summary["levels"]),
        plan.tissue_pieces,
        100 * plan.tissue_fraction,
        [f"{les['kind']}:{les['major_axis_um']:.0f}um" for les in summary["lesions"]],
        summary["exclusions"],
        summary["mimics"],
        summary["pen_marks"],
        summary["dust_specks"],
        file_bytes / 1e6,
        summary["write_s"],
    )
    return summary


def camelyon_scale_slide(
    out: str | Path,
    width_px: int = 100_000,
    height_px: int = 80_000,
    seed: int = 0,
    mpp: float = 0.25,
    label: str = "tumor",
    slide_id: str = "camelyon_scale",
    workers: int = 1,
    out_xml: str | Path | None = None,
) -> dict:
    """Write a Camelyon-scale synthetic slide (exact size, default 100000 x 80000 px at 0.25 um/px).

    Same generator as the demo (bounded memory); the XML goes beside ``out`` unless given.
    """
    out = Path(out)
    params = SynthSlideParams(
        seed=seed, width_px=width_px, height_px=height_px, mpp=mpp, size_jitter=0.0,
        workers=workers,
    )  # fmt: skip
    return synth_slide(
        out,
        out_xml if out_xml is not None else out.with_suffix(".xml"),
        params,
        slide_id=slide_id,
        label=label,
        progress=None,
    )
