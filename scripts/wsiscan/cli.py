"""``wsiscan <stage>``: parse the arguments of one stage and call its one function.

Every Snakemake rule calls exactly one of these subcommands; each can also be run by hand.
Errors meant for the user (:class:`~wsiscan.errors.WsiscanError`) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import WsiscanError
from .faults import OutputWriteError, clear_failure_record, write_failure_record
from .slide import check_slide_id

log = logging.getLogger("wsiscan")

Handler = Callable[[argparse.Namespace], object]


def _stage(sub: argparse._SubParsersAction, name: str, help_: str, func: Handler):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(func=func)
    return p


# -- synth ---------------------------------------------------------------------------------------
def _run_synth(a: argparse.Namespace) -> object:
    from .synth import synth_slide

    return synth_slide(
        slide_id=a.slide_id,
        label=a.label,
        seed=a.seed,
        out_slide=a.out_slide,
        out_xml=a.out_xml,
        width_px=a.width_px,
        height_px=a.height_px,
        mpp=a.mpp,
        size_jitter=a.size_jitter,
        workers=a.workers,
    )


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub, "synth", "Write one synthetic H&E-like pyramidal TIFF and its ASAP XML.", _run_synth
    )
    p.add_argument("--slide-id", required=True)
    p.add_argument("--label", choices=["tumor", "normal"], required=True)
    p.add_argument("--seed", type=int, required=True, help="cohort seed (mixed with the slide ID)")
    p.add_argument("--out-slide", type=Path, required=True, help="pyramidal .tif to write")
    p.add_argument("--out-xml", type=Path, required=True, help="ASAP XML of the tumour polygons")
    p.add_argument("--width-px", type=int, required=True, help="level-0 width in pixels")
    p.add_argument("--height-px", type=int, required=True, help="level-0 height in pixels")
    p.add_argument("--mpp", type=float, required=True, help="level-0 microns per pixel")
    p.add_argument(
        "--size-jitter",
        type=float,
        default=0.2,
        help="each side varies by +- this fraction (from the seed), then is made odd; "
        "0 keeps the size exact (default 0.2)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="threads rendering and encoding strips (default 1)"
    )


# -- mask ----------------------------------------------------------------------------------------
def _run_mask(a: argparse.Namespace) -> object:
    from .tissue import compute_tissue_mask

    return compute_tissue_mask(
        a.slide,
        a.slide_id,
        a.out_mask,
        a.out_qc,
        target_mpp=a.target_mpp,
        mpp_fallback=a.mpp_fallback,
        method=a.method,
        closing_um=a.closing_um,
        min_area_um2=a.min_area_um2,
        hole_area_um2=a.hole_area_um2,
        min_saturation=a.min_saturation,
        min_darkness=a.min_darkness,
        min_contrast=a.min_contrast,
        artefact_filter=a.artefact_filter,
        artefact_hue_range=tuple(a.artefact_hue_range),
        dark_max_value=a.dark_max_value,
    )


def _add_mask(sub: argparse._SubParsersAction) -> None:
    from . import tissue as t

    p = _stage(sub, "mask", "Otsu tissue mask (PNG + metadata) and its QC picture.", _run_mask)
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--out-mask", type=Path, required=True, help="tissue.png to write (0/255)")
    p.add_argument("--out-qc", type=Path, required=True, help="QC picture: outline on thumbnail")
    p.add_argument(
        "--target-mpp",
        type=float,
        default=t.DEFAULT_TARGET_MPP,
        help="mask resolution in um/px: the level nearest it, block-averaged if finer; default %(default)s",
    )
    p.add_argument(
        "--method",
        choices=t.METHODS,
        default="saturation",
        help="Otsu on HSV saturation, grey (darkness), both (AND) or either (OR); default %(default)s",
    )
    p.add_argument(
        "--closing-um",
        type=float,
        default=t.DEFAULT_CLOSING_UM,
        help="closing disk diameter in um (bridges narrower gaps); 0 = none; default %(default)s",
    )
    p.add_argument(
        "--min-area-um2",
        type=float,
        default=t.DEFAULT_MIN_AREA_UM2,
        help="tissue pieces smaller than this (um^2) are dropped; default %(default)s",
    )
    p.add_argument(
        "--hole-area-um2",
        type=float,
        default=t.DEFAULT_HOLE_AREA_UM2,
        help="holes smaller than this (um^2) are filled; default %(default)s",
    )
    p.add_argument(
        "--min-saturation",
        type=float,
        default=t.DEFAULT_MIN_SATURATION,
        help="saturation floor (0-1): less saturated pixels are never tissue; default %(default)s",
    )
    p.add_argument(
        "--min-darkness",
        type=float,
        default=t.DEFAULT_MIN_DARKNESS,
        help="darkness (1 - luminance) floor for the grey test (0-1); default %(default)s",
    )
    p.add_argument(
        "--min-contrast",
        type=float,
        default=t.DEFAULT_MIN_CONTRAST,
        help="Otsu class means closer than this (0-1): blank slide, no tissue; default %(default)s",
    )
    p.add_argument(
        "--no-artefact-filter",
        dest="artefact_filter",
        action="store_false",
        help="keep pen-coloured and very dark pixels as tissue candidates",
    )
    p.add_argument(
        "--artefact-hue-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=t.DEFAULT_ARTEFACT_HUE_RANGE,
        help="HSV hue range (0-1) of pen ink, never tissue; default %(default)s (green to blue)",
    )
    p.add_argument(
        "--dark-max-value",
        type=float,
        default=t.DEFAULT_DARK_MAX_VALUE,
        help="pixels with HSV value below this (0-1) are ink or dirt, never tissue; default %(default)s",
    )
    p.add_argument(
        "--mpp-fallback",
        type=float,
        default=None,
        help="um/px for a slide that carries no resolution",
    )


# -- grid ----------------------------------------------------------------------------------------
def _run_grid(a: argparse.Namespace) -> object:
    from .grid import compute_grid

    return compute_grid(
        a.slide,
        a.mask,
        a.out,
        slide_id=a.slide_id,
        arch=a.arch,
        n=a.n,
        alpha=a.alpha,
        min_tissue_fraction=a.min_tissue_fraction,
        mpp_fallback=a.mpp_fallback,
    )


def _add_grid(sub: argparse._SubParsersAction) -> None:
    from .geometry import ALPHAS, ARCHITECTURES

    p = _stage(
        sub, "grid", "ROI grid of the network's geometry over the tissue: rois.h5.", _run_grid
    )
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--mask", type=Path, required=True, help="tissue.png from `wsiscan mask`")
    p.add_argument("--out", type=Path, required=True, help="rois.h5 to write")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vgg16")
    p.add_argument("--n", type=int, required=True, help="ROI side Lr = Lf + n*Sf (paper: 82)")
    p.add_argument(
        "--alpha",
        type=int,
        choices=ALPHAS,
        required=True,
        help="dense factor: output stride Sd = Sf/alpha",
    )
    p.add_argument(
        "--min-tissue-fraction",
        type=float,
        default=0.0,
        help="keep a block when this share (0-1) of its output coverage is tissue",
    )
    p.add_argument(
        "--mpp-fallback",
        type=float,
        default=None,
        help="um/px for a slide that carries no resolution",
    )


# -- install-profile -----------------------------------------------------------------------------
def _run_install_profile(a: argparse.Namespace) -> object:
    from .profiles import install_profile

    target = install_profile(a.name, source=a.source, dest_root=a.dest, copy=a.copy, force=a.force)
    print(f"snakemake --profile {a.name} now uses {target}")
    return target


def _add_install_profile(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub,
        "install-profile",
        "Link this repository's Snakemake profile where `snakemake --profile <name>` finds it.",
        _run_install_profile,
    )
    p.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    p.add_argument(
        "--source", type=Path, default=None, help="profile folder (default: profiles/<name>)"
    )
    p.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="profile root (default: the user's Snakemake config folder, "
        "$XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)",
    )
    p.add_argument("--copy", action="store_true", help="copy instead of a symbolic link")
    p.add_argument("--force", action="store_true", help="move an existing different profile aside")


# -- detect --------------------------------------------------------------------------------------
def _run_detect(a: argparse.Namespace) -> object:
    from .detect import detect_slide

    return detect_slide(
        a.probmap,
        a.out_csv,
        a.out_score,
        a.out_geojson,
        a.out_xml,
        slide_id=a.slide_id,
        method=a.method,
        threshold=a.threshold,
        radius_um=a.nms_radius_um,
        min_area_um2=a.min_area_um2,
    )


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub,
        "detect",
        "Lesion points (confidence,x,y at level 0), slide score and region exports from a map.",
        _run_detect,
    )
    p.add_argument("--probmap", type=Path, required=True, help="probmap.h5 of the stitch stage")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--out-csv", type=Path, required=True, help="lesions.csv (confidence,x,y)")
    p.add_argument("--out-score", type=Path, required=True, help="score.json (slide score)")
    p.add_argument("--out-geojson", type=Path, required=True, help="regions as QuPath GeoJSON")
    p.add_argument("--out-xml", type=Path, required=True, help="regions as ASAP XML (group _0)")
    p.add_argument(
        "--method",
        choices=["nms", "components"],
        default="nms",
        help="nms: iterative non-maximum suppression; components: one point per component of "
        "the map's cleaned lesion mask",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="NMS stops below this probability")
    p.add_argument("--nms-radius-um", type=float, default=200.0, help="NMS suppression radius")
    p.add_argument(
        "--min-area-um2",
        type=float,
        default=0.0,
        help="drop components (method components, region exports) smaller than this",
    )


# -- evaluate ------------------------------------------------------------------------------------
def _run_evaluate(a: argparse.Namespace) -> object:
    from .evaluate import evaluate_cohort

    return evaluate_cohort(
        a.sheet,
        a.results,
        a.out,
        split=a.split,
        exclude=a.exclude,
        fp_on_negative_only=a.froc_fp_on_negative_only,
        interpolation=a.interpolation,
        bootstrap=a.bootstrap,
        seed=a.seed,
        allow_missing=a.allow_missing,
        config_checksum=a.config_checksum,
        model_path=a.model,
        failed=a.failed,
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub,
        "evaluate",
        "Camelyon16 FROC and slide ROC/AUC of a cohort, with bootstrap CIs, plots, submission.",
        _run_evaluate,
    )
    p.add_argument("--sheet", type=Path, required=True, help="sample sheet (slides.tsv)")
    p.add_argument("--results", type=Path, required=True, help="folder of <slide_id>/ results")
    p.add_argument("--out", type=Path, required=True, help="output folder (results/cohort)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument(
        "--froc-fp-on-negative-only",
        action="store_true",
        help="variant: count FPs on normal slides only, over the number of normal slides",
    )
    p.add_argument(
        "--interpolation",
        choices=["linear", "nearest"],
        default="linear",
        help="linear (official) or the best operating point at or below each FP rate",
    )
    p.add_argument(
        "--exclude", nargs="*", default=[], metavar="SLIDE_ID", help="slides left out of FROC"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="list slides whose outputs are missing, or whose job failed (FAILED.json), in "
        "metrics.json instead of stopping",
    )
    p.add_argument(
        "--failed",
        nargs="*",
        default=None,
        metavar="SLIDE_ID",
        help="with --allow-missing: slides to list as failed instead of reading them (default: "
        "those whose results/<slide>/FAILED.json is newer than their files)",
    )
    p.add_argument(
        "--config-checksum", default=None, help="checksum of the workflow config (provenance)"
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model checkpoint that scored the slides (its SHA-256 goes into metrics.json)",
    )


# -- sheet ---------------------------------------------------------------------------------------
def _run_sheet(a: argparse.Namespace) -> object:
    from .sheet import build_camelyon16_sheet

    return build_camelyon16_sheet(a.root, a.out, reference_csv=a.reference)


def _add_sheet(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub,
        "sheet",
        "Build the sample sheet (slides.tsv) from a Camelyon16 download.",
        _run_sheet,
    )
    p.add_argument("--root", type=Path, required=True, help="folder holding training/, testing/")
    p.add_argument("--out", type=Path, required=True, help="slides.tsv to write")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="test labels CSV (default: <root>/testing/reference.csv)",
    )


# -- init-model ----------------------------------------------------------------------------------
def _run_init_model(a: argparse.Namespace) -> object:
    from .model import init_model_checkpoint

    return init_model_checkpoint(
        a.out,
        arch=a.arch,
        width=a.width,
        batchnorm=a.batchnorm,
        seed=a.seed,
        imagenet_weights=a.imagenet_weights,
    )


def _add_init_model(sub: argparse._SubParsersAction) -> None:
    from .geometry import ARCHITECTURES

    p = _stage(
        sub,
        "init-model",
        "Write an untrained ScanNet checkpoint (random or ImageNet-initialised trunk).",
        _run_init_model,
    )
    p.add_argument("--out", type=Path, required=True, help="model.pt to write")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vgg16")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (paper: 1)")
    p.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorm after each convolution",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random init")
    p.add_argument(
        "--imagenet-weights",
        type=Path,
        default=None,
        help="local torchvision VGG16 / VGG16-BN state dict for the trunk (needs width 1)",
    )


# -- infer ---------------------------------------------------------------------------------------
def _run_infer(a: argparse.Namespace) -> object:
    from .infer import infer_slide

    return infer_slide(
        a.slide,
        a.rois,
        a.model,
        a.out,
        slide_id=a.slide_id,
        batch_size=a.batch_size,
        num_workers=a.workers,
        device=a.device,
        amp=a.amp,
        tile_dtype=a.tile_dtype,
        dense_mode=a.dense_mode,
        mpp_fallback=a.mpp_fallback,
        threads=a.threads,
    )


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub, "infer", "Dense ScanNet tiles for every block of rois.h5: tiles.h5.", _run_infer
    )
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--rois", type=Path, required=True, help="rois.h5 from `wsiscan grid`")
    p.add_argument("--model", type=Path, required=True, help="model checkpoint (model.pt)")
    p.add_argument("--out", type=Path, required=True, help="tiles.h5 to write")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per device batch")
    p.add_argument("--workers", type=int, default=2, help="slide-reading worker processes")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="mixed precision on CUDA (bf16, else fp16); exactness holds in float32 only",
    )
    p.add_argument("--tile-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument(
        "--dense-mode",
        choices=["single", "shift"],
        default="single",
        help="single pass (anchor layers) or shift-and-stitch; same tiles",
    )
    p.add_argument(
        "--mpp-fallback",
        type=float,
        default=None,
        help="um/px for a slide that carries no resolution",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


# -- stitch --------------------------------------------------------------------------------------
def _run_stitch(a: argparse.Namespace) -> object:
    from .stitch import stitch_slide

    return stitch_slide(
        a.tiles,
        a.out,
        a.qc,
        slide_path=a.slide,
        slide_id=a.slide_id,
        threshold=a.threshold,
        opening_um=a.opening_um,
        closing_um=a.closing_um,
        mpp_fallback=a.mpp_fallback,
    )


def _add_stitch(sub: argparse._SubParsersAction) -> None:
    from .stitch import DEFAULT_CLOSING_UM, DEFAULT_OPENING_UM, DEFAULT_THRESHOLD

    p = _stage(
        sub,
        "stitch",
        "Stitch dense tiles into the slide probability map and lesion mask: probmap.h5.",
        _run_stitch,
    )
    p.add_argument("--tiles", type=Path, required=True, help="tiles.h5 from `wsiscan infer`")
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image (QC thumbnail)")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--out", type=Path, required=True, help="probmap.h5 to write")
    p.add_argument("--qc", type=Path, required=True, help="heat map PNG to write")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"tumour probability threshold of the mask (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--opening-um",
        type=float,
        default=DEFAULT_OPENING_UM,
        help=f"opening radius in um, 0 = off (default {DEFAULT_OPENING_UM})",
    )
    p.add_argument(
        "--closing-um",
        type=float,
        default=DEFAULT_CLOSING_UM,
        help=f"closing radius in um, 0 = off (default {DEFAULT_CLOSING_UM})",
    )
    p.add_argument(
        "--mpp-fallback",
        type=float,
        default=None,
        help="um/px for a slide that carries no resolution",
    )


# -- train-samples -------------------------------------------------------------------------------
def _run_train_samples(a: argparse.Namespace) -> object:
    from .errors import ConfigError
    from .samples import SampleParams, TrainSlide, generate_samples

    slides = []
    for fields in a.slide:
        if len(fields) not in (4, 5):
            raise ConfigError(
                f"--slide takes ID LABEL SLIDE MASK [ANNOTATION], got {len(fields)} value(s): "
                f"{fields}"
            )
        sid, label, path, mask = fields[:4]
        annotation = fields[4] if len(fields) == 5 else None
        slides.append(TrainSlide(sid, path, label, mask, annotation))
    params = SampleParams(
        n_samples=a.samples,
        positive_fraction=a.positive_fraction,
        positive_margin_um=a.positive_margin_um,
        negative_margin_um=a.negative_margin_um,
        raster_mpp=a.raster_mpp,
        val_fraction=a.val_fraction,
        seed=a.seed,
    )
    return generate_samples(slides, a.out, params, arch=a.arch, mpp_fallback=a.mpp_fallback)


def _add_train_samples(sub: argparse._SubParsersAction) -> None:
    from .geometry import ARCHITECTURES
    from .samples import SampleParams

    d = SampleParams()
    p = _stage(
        sub,
        "train-samples",
        "Draw the training patch centres (tumour positives, tissue negatives): samples.h5.",
        _run_train_samples,
    )
    p.add_argument(
        "--slide",
        nargs="+",
        action="append",
        required=True,
        metavar="FIELD",
        help="one training slide: ID LABEL(tumor|normal) SLIDE MASK(tissue.png) [ANNOTATION(XML)]; "
        "repeat --slide for every slide",
    )
    p.add_argument("--out", type=Path, required=True, help="samples.h5 to write")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vgg16")
    p.add_argument("--samples", type=int, default=d.n_samples, help="centres over all slides")
    p.add_argument("--positive-fraction", type=float, default=d.positive_fraction)
    p.add_argument(
        "--positive-margin-um",
        type=float,
        default=d.positive_margin_um,
        help="positives lie at least this far inside the tumour border",
    )
    p.add_argument(
        "--negative-margin-um",
        type=float,
        default=d.negative_margin_um,
        help="negatives lie at least this far from any tumour",
    )
    p.add_argument("--raster-mpp", type=float, default=d.raster_mpp, help="candidate spacing in um")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share of the slides of each label held out for validation",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--mpp-fallback", type=float, default=None, help="um/px for slides without resolution"
    )


# -- train-round ---------------------------------------------------------------------------------
def _run_train_round(a: argparse.Namespace) -> object:
    from .params import AugmentParams, TrainParams
    from .train import train_round

    params = TrainParams(
        round_index=a.round,
        arch=a.arch,
        width=a.width,
        batchnorm=a.batchnorm,
        dropout=a.dropout,
        epochs=a.epochs,
        samples_per_epoch=a.samples_per_epoch,
        batch_size=a.batch_size,
        optimizer=a.optimizer,
        lr=a.lr,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps,
        positive_fraction=a.positive_fraction,
        hard_negative_fraction=a.hard_negative_fraction,
        val_samples=a.val_samples,
        augment=AugmentParams(
            flips=a.flips,
            rotate90=a.rotate90,
            brightness=a.brightness,
            contrast=a.contrast,
            saturation=a.saturation,
            hue=a.hue,
        ),
        workers=a.workers,
        threads=a.threads,
        device=a.device,
        amp=a.amp,
        seed=a.seed,
        mpp_fallback=a.mpp_fallback,
    )
    return train_round(
        a.samples,
        a.out_model,
        a.out_metrics,
        a.out_loss_png,
        params,
        hard_negatives=a.hard_negatives,
        init_checkpoint=a.init_model,
        imagenet_weights=a.imagenet_weights,
        checkpoint_path=a.checkpoint,
    )


def _add_train_round(sub: argparse._SubParsersAction) -> None:
    from .geometry import ARCHITECTURES
    from .params import AugmentParams, TrainParams

    d, aug = TrainParams(), AugmentParams()
    p = _stage(
        sub,
        "train-round",
        "Train one round of ScanNet on patches read by prefetching workers: model.pt.",
        _run_train_round,
    )
    p.add_argument("--round", type=int, required=True, help="round number k >= 1")
    p.add_argument("--samples", type=Path, required=True, help="samples.h5")
    p.add_argument(
        "--hard-negatives",
        type=Path,
        nargs="*",
        default=[],
        help="hard_negatives.h5 of the earlier rounds",
    )
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init-model", type=Path, help="model.pt to fine-tune (previous round)")
    init.add_argument(
        "--imagenet-weights", type=Path, help="torchvision VGG16(-BN) state dict for the trunk"
    )
    p.add_argument("--out-model", type=Path, required=True, help="model.pt to write")
    p.add_argument("--out-metrics", type=Path, required=True, help="metrics.json to write")
    p.add_argument("--out-loss-png", type=Path, required=True, help="loss curve PNG to write")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="resumable state (default: checkpoint.pt beside --out-model)",
    )
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=d.arch)
    p.add_argument("--width", type=float, default=d.width, help="channel multiplier")
    p.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=d.batchnorm)
    p.add_argument("--dropout", type=float, default=d.dropout, help="head dropout in training")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--samples-per-epoch", type=int, default=d.samples_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--positive-fraction", type=float, default=d.positive_fraction)
    p.add_argument(
        "--hard-negative-fraction",
        type=float,
        default=d.hard_negative_fraction,
        help="share of each epoch drawn from the hard negatives (taken from the negatives)",
    )
    p.add_argument("--val-samples", type=int, default=d.val_samples)
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=aug.flips)
    p.add_argument("--rotate90", action=argparse.BooleanOptionalAction, default=aug.rotate90)
    p.add_argument("--brightness", type=float, default=aug.brightness, help="jitter factor")
    p.add_argument("--contrast", type=float, default=aug.contrast, help="jitter factor")
    p.add_argument("--saturation", type=float, default=aug.saturation, help="jitter factor")
    p.add_argument("--hue", type=float, default=aug.hue, help="jitter, fraction of a hue turn")
    p.add_argument("--workers", type=int, default=d.workers, help="patch-reading worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help="auto (CUDA if available), cpu, cuda:N")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=d.amp,
        help="mixed precision (float16 autocast + GradScaler) on CUDA",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--mpp-fallback", type=float, default=None, help="um/px for slides without resolution"
    )


# -- mine-negatives ------------------------------------------------------------------------------
def _run_mine_negatives(a: argparse.Namespace) -> object:
    from .mining import MineParams, mine_negatives

    params = MineParams(
        threshold=a.threshold,
        margin_um=a.margin_um,
        max_per_slide=a.max_per_slide,
        max_per_round=a.max_per_round,
        raster_mpp=a.raster_mpp,
        block_fraction=a.block_fraction,
        batch_size=a.batch_size,
        workers=a.workers,
        threads=a.threads,
        device=a.device,
        amp=a.amp,
        dense_mode=a.dense_mode,
        seed=a.seed,
    )
    return mine_negatives(
        a.samples,
        a.model,
        a.rois,
        a.out,
        params,
        round_index=a.round,
        mpp_fallback=a.mpp_fallback,
    )


def _add_mine_negatives(sub: argparse._SubParsersAction) -> None:
    from .mining import MineParams

    d = MineParams()
    p = _stage(
        sub,
        "mine-negatives",
        "Run a round's model densely over the training slides; false positives outside tumour "
        "become hard negatives: hard_negatives.h5.",
        _run_mine_negatives,
    )
    p.add_argument("--round", type=int, required=True, help="round k of the model")
    p.add_argument("--samples", type=Path, required=True, help="samples.h5 (the slide table)")
    p.add_argument("--model", type=Path, required=True, help="round k's model.pt")
    p.add_argument(
        "--rois", type=Path, nargs="+", required=True, help="rois.h5 of every training slide"
    )
    p.add_argument("--out", type=Path, required=True, help="hard_negatives.h5 to write")
    p.add_argument("--threshold", type=float, default=d.threshold, help="tumour probability")
    p.add_argument(
        "--margin-um",
        type=float,
        default=d.margin_um,
        help="cells at least this far outside tumour count as false positives",
    )
    p.add_argument("--max-per-slide", type=int, default=d.max_per_slide)
    p.add_argument("--max-per-round", type=int, default=d.max_per_round)
    p.add_argument("--raster-mpp", type=float, default=d.raster_mpp, help="tumour raster um/px")
    p.add_argument(
        "--block-fraction",
        type=float,
        default=d.block_fraction,
        help="share of each slide's blocks scanned (seeded per round; 1 = all)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="blocks per batch")
    p.add_argument("--workers", type=int, default=d.workers, help="block-reading workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help="auto (CUDA if available), cpu, cuda:N")
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=d.amp, help="mixed precision"
    )
    p.add_argument("--dense-mode", choices=["single", "shift"], default=d.dense_mode)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--mpp-fallback", type=float, default=None, help="um/px for slides without resolution"
    )


# -- parser --------------------------------------------------------------------------------------
STAGES = [
    _add_synth,
    _add_mask,
    _add_grid,
    _add_init_model,
    _add_infer,
    _add_stitch,
    _add_install_profile,
    _add_detect,
    _add_evaluate,
    _add_sheet,
    _add_train_samples,
    _add_train_round,
    _add_mine_negatives,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``wsiscan`` argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(prog="wsiscan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsiscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--failure-record",
        type=Path,
        default=None,
        metavar="JSON",
        help="on failure write {stage, cause} here (atomically); on success remove it "
        "(the workflow passes results/<slide>/FAILED.json)",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for add in STAGES:
        add(sub)
    return parser


#: Stages that run torch on the CPU as well as on a GPU.
TORCH_STAGES = frozenset({"infer", "train-round", "mine-negatives"})
#: glibc malloc settings for the torch stages: freed activation buffers stay in the heap instead
#: of going back to the kernel and page-faulting in again at the next batch. The mmap threshold
#: (16 GiB) lies above the largest activation (conv1 of a 2884 px block at full width: 2.1 GB per
#: block), and the heap is not trimmed (32 GiB), so a process keeps its peak until it exits.
#: Measured: CPU inference of the demo model 1.8x, a training step 1.7x and the full-width FCN on a
#: 2868 px ROI 1.5x faster (benchmarks/README.md, ``malloc`` and ``fcn_vs_patch``). glibc reads
#: them at process start only (``mallopt`` caps the mmap threshold at 32 MiB).
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**35)}
NO_MALLOC_TUNING_ENV = "WSISCAN_MALLOC_TUNING"  # "0": keep the allocator's defaults


def malloc_tuning_applies(stage: str, environ: dict[str, str] | os._Environ) -> bool:
    """Whether ``wsiscan <stage>`` should restart itself with :data:`MALLOC_TUNING`: a torch stage,
    glibc, not switched off, and neither variable set already (by the user or a first start)."""
    return (
        stage in TORCH_STAGES
        and sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and environ.get(NO_MALLOC_TUNING_ENV, "1") != "0"
        and not any(key in environ for key in MALLOC_TUNING)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsiscan`` command."""
    args = build_parser().parse_args(argv)
    if argv is None and malloc_tuning_applies(args.stage, os.environ):
        # the same command once more, same PID, with the allocator settings in its environment
        os.execve(  # noqa: S606 (an argument list, no shell)
            sys.executable,
            [sys.executable, "-m", "wsiscan", *sys.argv[1:]],
            {**os.environ, **MALLOC_TUNING},
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.stage in TORCH_STAGES:
        tuned = {k: os.environ[k] for k in MALLOC_TUNING if k in os.environ}
        log.debug("glibc malloc settings: %s", tuned or "defaults")
    slide_id = getattr(args, "slide_id", None)
    try:
        if slide_id is not None:
            check_slide_id(slide_id)
        args.func(args)
    except WsiscanError as exc:
        _record_failure(args, exc, str(exc))
        print(f"wsiscan {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, file too large, I/O error: the cause, not a traceback
        log.debug("traceback", exc_info=True)
        where = f"slide {slide_id!r}: " if slide_id else ""
        if isinstance(exc, OutputWriteError):
            where += "cannot write an output: "
        _record_failure(args, exc, f"{where}{exc}")
        print(f"wsiscan {args.stage}: error: {where}{exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: keep the traceback, but record the failure
        _record_failure(args, exc, f"{type(exc).__name__}: {exc}")
        raise
    if args.failure_record is not None and clear_failure_record(args.failure_record):
        log.info("removed the failure record %s of an earlier run", args.failure_record)
    return 0


def _record_failure(args: argparse.Namespace, exc: BaseException, cause: str) -> None:
    """Write ``--failure-record`` (if given); a failure to write it is logged, not raised."""
    if args.failure_record is None:
        return
    try:
        write_failure_record(
            args.failure_record,
            stage=args.stage,
            slide_id=getattr(args, "slide_id", None),
            cause=cause,
            error=type(exc).__name__,
        )
    except OSError as write_exc:
        log.warning("cannot write the failure record %s: %s", args.failure_record, write_exc)


if __name__ == "__main__":
    sys.exit(main())
