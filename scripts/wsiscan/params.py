"""Settings and stage parameter records: every config key is declared here, once.

:data:`SETTINGS` is the table of every key of ``config/config.yaml``: its type, default, unit, range
and help. It is the only place a default is written; the rest is derived from it:

* the config schema (``workflow/schemas/config.schema.yaml``) and the config reference
  (``config/README.md``) are generated from it (:mod:`wsiscan.config`, ``wsiscan config-docs``);
* each stage has one frozen parameter record (:class:`InferParams`, ...), whose fields are the
  config keys that stage reads, with the table's defaults, help and ranges (checked on creation);
* ``wsiscan <stage>`` adds one option per record field (:mod:`wsiscan.cli`), and the workflow's
  rules forward the same fields from the config (:mod:`wsiscan.dag`).

A setting marked ``runtime`` (workers, threads, batch sizes of inference, the device, ...) cannot
change any output: the workflow passes it outside Snakemake's parameter trigger, so editing it
never re-runs a job. Everything else is a result setting: editing it re-runs the stages that
read it, and what depends on them.

No torch and no Snakemake here: the command line is built from this module in a fraction of a
second.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

#: Plausible level-0 resolutions of a whole-slide scan (um/px); outside: not a slide resolution.
PLAUSIBLE_MPP = (0.05, 20.0)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


@dataclass(frozen=True)
class Setting:
    """One config key: dotted ``key``, value ``kind``, ``default``, ``help`` and its limits.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``list`` (of ``item`` values, any length)
    or ``tuple`` (of ``length`` ``item`` values). ``minimum``/``maximum`` bound numbers (and the
    items of lists and tuples), exclusively when ``exclusive`` names the side (``"min"``,
    ``"max"``, ``"both"``). ``nullable`` admits ``None``. ``runtime`` marks a setting that cannot
    change an output.
    """

    key: str
    kind: type
    default: Any
    help: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive: str = ""
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    nullable: bool = False
    runtime: bool = False
    item: type | None = None
    length: int | None = None
    ascending: bool = False
    required: bool = False

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def description(self) -> str:
        """Help text with the unit and, for run-time settings, that they never re-run a job."""
        text = self.help + (f" [{self.unit}]" if self.unit else "")
        if self.runtime:
            text += " (run-time only: changes no output, never re-runs a job)"
        return text

    def check(self, value: Any) -> Any:
        """``value`` converted to this setting's type (lists become tuples); ``ValueError`` with
        the reason when it does not fit."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError("must not be null")
        if self.kind in (list, tuple):
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(f"must be a list, got {value!r}")
            items = tuple(self._scalar(v, self.item or str) for v in value)
            if self.length is not None and len(items) != self.length:
                raise ValueError(f"must hold {self.length} values, got {len(items)}")
            if self.ascending and list(items) != sorted(items):
                raise ValueError(f"must be in ascending order, got {list(items)}")
            return items
        return self._scalar(value, self.kind)

    def _scalar(self, value: Any, kind: type) -> Any:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"must be an integer, got {value!r}")
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise ValueError(f"must be an integer, got {value!r}")
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {list(self.choices)}, got {value!r}")
        if self.pattern is not None and kind is str and not re.match(self.pattern, value):
            raise ValueError(f"{value!r} does not match {self.pattern}")
        if kind in (int, float):
            low_open = self.exclusive in ("min", "both")
            high_open = self.exclusive in ("max", "both")
            if self.minimum is not None and (
                value <= self.minimum if low_open else value < self.minimum
            ):
                raise ValueError(f"must be {'>' if low_open else '>='} {self.minimum}, got {value}")
            if self.maximum is not None and (
                value >= self.maximum if high_open else value > self.maximum
            ):
                raise ValueError(
                    f"must be {'<' if high_open else '<='} {self.maximum}, got {value}"
                )
        return value


def _s(key: str, kind: type, default: Any, help: str, **limits: Any) -> Setting:
    setting = Setting(key, kind, default, help, **limits)
    if not setting.required:
        setting.check(default)  # the table's own defaults fit their limits
    return setting


_FRACTION = {"minimum": 0.0, "maximum": 1.0}
_DEVICE = {"pattern": DEVICE_PATTERN, "runtime": True}

#: What each config section is for (the schema's and config/README.md's section descriptions).
SECTIONS: dict[str, str] = {
    "": "wsiscan workflow configuration (config/config.yaml)",
    "demo": "the embedded demo cohort: slides whose path is data/demo/<slide_id>.tif are written "
    "by rule synth_slide",
    "slide": "reading slides (every stage that opens a slide file)",
    "tissue": "the tissue mask (rule tissue_mask): Otsu threshold and morphology on a "
    "low-resolution level",
    "scan": "the scan geometry (rule roi_grid): Lf and Sf come from the network, n sets the ROI "
    "side Lr = Lf + n*Sf",
    "model": "the network (rules init_model, train_round) and the checkpoint inference uses",
    "infer": "dense FCN inference over the ROI blocks (rule infer)",
    "stitch": "the slide probability map and its lesion mask (rule stitch)",
    "detect": "lesion points, slide score and region exports (rule detect)",
    "annotation": "reading the tumour annotations (rules evaluate, train_patches, mine_negatives): "
    "which groups (ASAP PartOfGroup, QuPath GeoJSON classification name) are tumour and which "
    "are exclusions cut out of it",
    "evaluate": "the cohort evaluation by the Camelyon16 protocol (rule evaluate)",
    "operating": "the operating threshold of the slide call (rules evaluate, summarise): chosen on "
    "the labelled slides of the evaluated split, or given for a cohort without labels",
    "summarise": "the cohort summary for the pathologist (rule summarise): summary.tsv, "
    "patients.tsv, staging.json",
    "train": "training rounds with hard-negative mining between them (rules train_patches, "
    "train_round, mine_negatives)",
    "train.augment": "patch augmentation in the training loader's worker processes (rule "
    "train_round): flips, rotations, HED stain augmentation (Tellez et al. 2018) and colour jitter",
    "train.mine": "hard-negative mining with each round's model (rule mine_negatives)",
    "stain": "stain normalisation (Macenko): the reference stain is fitted on the training slides "
    "by train_round and stored in model.pt; infer and mine_negatives normalise every slide to it "
    "exactly when the model holds one",
}

#: Every config key, in config-file order.
SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        _s("samples", str, None, "sample sheet (TSV): slide_id, path, annotation, label, split",
           required=True),
        # -- demo --
        _s("demo.seed", int, 2018, "cohort seed, mixed with each slide ID"),
        _s("demo.width_px", int, 7000, "level-0 width around which each demo slide varies",
           unit="px", minimum=1000, maximum=200_000),
        _s("demo.height_px", int, 5000, "level-0 height around which each demo slide varies",
           unit="px", minimum=1000, maximum=200_000),
        _s("demo.mpp", float, 0.5, "level-0 resolution of the demo slides", unit="um/px",
           minimum=PLAUSIBLE_MPP[0], maximum=PLAUSIBLE_MPP[1]),
        _s("demo.size_jitter", float, 0.2, "each side varies by +- this fraction (from the seed); "
           "0 keeps the size exact", minimum=0.0, maximum=0.5),
        _s("demo.workers", int, 1, "threads rendering and encoding a slide", minimum=1,
           maximum=256, runtime=True),
        # -- slide --
        _s("slide.mpp_fallback", float, None, "resolution used for a slide whose file carries "
           "none (only such slides use it, and only they re-run when it changes); null: such a "
           "slide fails", unit="um/px", nullable=True, minimum=PLAUSIBLE_MPP[0],
           maximum=PLAUSIBLE_MPP[1]),
        # -- tissue --
        _s("tissue.target_mpp", float, 8.0, "the mask is computed on the pyramid level nearest "
           "this resolution (block-averaged to it if finer)", unit="um/px", minimum=0.0,
           maximum=1000.0, exclusive="min"),
        _s("tissue.method", str, "saturation", "Otsu on HSV saturation, on grey (darkness), both "
           "(AND) or either (OR)", choices=("saturation", "grey", "both", "either")),
        _s("tissue.closing_diameter_um", float, 50.0, "diameter of the closing disk: bridges "
           "gaps narrower than this; 0 = none", unit="um", minimum=0.0, maximum=10_000.0),
        _s("tissue.min_area_um2", float, 4000.0, "tissue pieces smaller than this are dropped "
           "(dust, debris)", unit="um^2", minimum=0.0, maximum=1e9),
        _s("tissue.hole_area_um2", float, 50000.0, "holes smaller than this are filled",
           unit="um^2", minimum=0.0, maximum=1e10),
        _s("tissue.min_saturation", float, 0.05, "saturation floor: less saturated pixels are "
           "never tissue (HSV units)", **_FRACTION),
        _s("tissue.min_darkness", float, 0.10, "darkness (1 - luminance) floor of the grey test",
           **_FRACTION),
        _s("tissue.min_contrast", float, 0.05, "Otsu class means closer than this: a blank slide, "
           "no tissue", **_FRACTION),
        _s("tissue.artefact_filter", bool, True, "set pen-coloured and very dark pixels aside "
           "(never tissue)"),
        _s("tissue.artefact_hue_range", tuple, (0.20, 0.64), "HSV hue range [low, high] of pen "
           "ink (green to blue), never tissue", item=float, length=2, ascending=True,
           **_FRACTION),
        _s("tissue.dark_max_value", float, 0.15, "pixels with HSV value below this are ink or "
           "dirt, never tissue", **_FRACTION),
        # -- scan --
        _s("scan.arch", str, "vgg16", "network layer list the geometry and the model are built "
           "from", choices=("vgg16",)),
        _s("scan.n", int, 82, "ROI side Lr = Lf + n*Sf (paper: 82, Lr = 2868 px)", minimum=0,
           maximum=256),
        _s("scan.roi_side_px", int, None, "instead of n: the ROI side Lr, which must be "
           "Lf + n*Sf (vgg16: 244 + n*32)", unit="px", nullable=True, minimum=1,
           maximum=100_000),
        _s("scan.alpha", int, 2, "dense reconstruction factor: output stride Sd = Sf / alpha",
           choices=(1, 2, 4)),
        _s("scan.min_tissue_fraction", float, 0.0, "keep a block when this share of its output "
           "coverage is tissue (any tissue at 0)", **_FRACTION),
        # -- model --
        _s("model.width", float, 1.0, "channel multiplier of the networks init_model and "
           "train_round build (1 is the paper's VGG16); a model.checkpoint carries its own width, "
           "which inference uses", minimum=0.0, maximum=1.0, exclusive="min"),
        _s("model.batchnorm", bool, True, "BatchNorm after every convolution but the last"),
        _s("model.checkpoint", str, None, "a trained model.pt: inference uses it and no "
           "training runs", nullable=True),
        _s("model.imagenet_weights", str, None, "torchvision VGG16(-BN) state dict file that "
           "initialises the trunk (needs width 1)", nullable=True),
        _s("model.seed", int, 0, "seed of the random init of the untrained model (train.rounds "
           "0)"),
        # -- infer --
        _s("infer.amp", bool, False, "mixed precision on CUDA (bf16, else fp16); exactness holds "
           "in float32 only"),
        _s("infer.tile_dtype", str, "float32", "dtype of the stored tiles",
           choices=("float32", "float16")),
        _s("infer.dense_mode", str, "single", "single pass (dilated anchor layers) or alpha^2 "
           "shifted passes: the same map", choices=("single", "shift"), runtime=True),
        _s("infer.batch_size", int, 4, "blocks per device batch", minimum=1, maximum=1024,
           runtime=True),
        _s("infer.workers", int, 2, "DataLoader processes reading blocks while the device "
           "computes", minimum=0, maximum=256, runtime=True),
        _s("infer.device", str, "auto", "auto (CUDA when there is one), cpu, cuda or cuda:N",
           **_DEVICE),
        # -- stitch --
        _s("stitch.threshold", float, 0.5, "tumour probability threshold of the lesion mask",
           **_FRACTION),
        _s("stitch.opening_radius_um", float, 0.0, "radius of the opening disk of the lesion "
           "mask; 0 = none", unit="um", minimum=0.0, maximum=10_000.0),
        _s("stitch.closing_radius_um", float, 0.0, "radius of the closing disk of the lesion "
           "mask; 0 = none", unit="um", minimum=0.0, maximum=10_000.0),
        _s("stitch.confine_to_tissue", bool, True, "set the map to 0 outside the tissue mask "
           "(dilated by tissue_margin_um): pen ink, labels and dust on the glass yield no lesion "
           "and no slide score"),
        _s("stitch.tissue_margin_um", float, 100.0, "the tissue mask is dilated by this before "
           "it confines the map, so tumour at the tissue border is kept", unit="um", minimum=0.0,
           maximum=10_000.0),
        # -- detect --
        _s("detect.method", str, "nms", "nms: iterative non-maximum suppression; components: one "
           "point per component of the lesion mask", choices=("nms", "components")),
        _s("detect.threshold", float, 0.5, "NMS stops below this tumour probability",
           **_FRACTION),
        _s("detect.nms_radius_um", float, 200.0, "NMS suppression radius", unit="um",
           minimum=0.0, maximum=100_000.0, exclusive="min"),
        _s("detect.min_area_um2", float, 0.0, "components (and exported regions) smaller than "
           "this are dropped", unit="um^2", minimum=0.0, maximum=1e12),
        _s("detect.outline_levels", list, (0.5, 0.9), "tumour probabilities at which outlines.geojson "
           "outlines the map (QuPath annotations, one class per level)", item=float,
           ascending=True, **_FRACTION),
        # -- annotation --
        _s("annotation.tumour_groups", list, ("Tumor", "_0", "_1"), "annotation groups that "
           "are tumour (Camelyon16: Tumor, _0, _1; Camelyon17 XML: metastases; QuPath: the "
           "classification name, e.g. Tumor)", item=str),
        _s("annotation.exclusion_groups", list, ("_2",), "annotation groups cut out of the "
           "tumour (Camelyon16: _2, non-tumour regions inside a lesion)", item=str),
        # -- evaluate --
        _s("evaluate.split", str, "test", "the split that is scanned and evaluated",
           choices=("train", "test")),
        _s("evaluate.exclude", list, (), "slide IDs left out of FROC (Camelyon16: Test_049, "
           "Test_114)", item=str),
        _s("evaluate.fp_on_negative_only", bool, False, "variant: count FPs on normal slides "
           "only (the official protocol counts them over all slides)"),
        _s("evaluate.interpolation", str, "linear", "linear (official) or the best operating "
           "point at or below each FP rate", choices=("linear", "nearest")),
        _s("evaluate.bootstrap", int, 1000, "resamples for the 95% confidence intervals (0: "
           "none)", minimum=0, maximum=100_000),
        _s("evaluate.seed", int, 0, "bootstrap seed"),
        _s("evaluate.allow_missing", bool, False, "evaluate the slides that finished and list "
           "the failed ones in metrics.json"),
        # -- operating threshold --
        _s("operating.method", str, "sensitivity", "how the threshold of the slide call is chosen "
           "on the labelled slides: sensitivity (the highest threshold whose slide sensitivity "
           "reaches target_sensitivity) or youden (the ROC point of largest sensitivity + "
           "specificity - 1)", choices=("sensitivity", "youden")),
        _s("operating.target_sensitivity", float, 0.95, "slide sensitivity the threshold must "
           "reach (method sensitivity)", minimum=0.0, maximum=1.0, exclusive="min"),
        _s("operating.threshold", float, None, "the slide-score threshold of the call, e.g. the "
           "operating_threshold.threshold of a labelled cohort's metrics.json; null: chosen on "
           "this cohort's labelled slides (without any: detect.threshold)", nullable=True,
           **_FRACTION),
        # -- summarise --
        _s("summarise.truth", str, None, "CSV in the Camelyon17 layout (patient,stage; rows "
           "<patient>.zip,<pN stage> and <slide>.tif,<negative|itc|micro|macro>) with the true "
           "slide categories and patient stages; null: only the sheet's true_category column",
           nullable=True),
        _s("evaluate.every_round", bool, False, "also scan and evaluate the split with the model "
           "of every earlier training round (results/rounds/round<k>/); results/cohort/rounds.tsv "
           "compares the rounds"),
        # -- train --
        _s("train.rounds", int, 2, "training rounds; raising it later runs only the new rounds "
           "(0: an untrained model)", minimum=0, maximum=50),
        _s("train.seed", int, 0, "seed of the patches, the training rounds and the mining"),
        _s("train.n_patches", int, 4000, "base training patches over all training slides (equal "
           "share per slide, water-filled)", minimum=2, maximum=100_000_000),
        _s("train.positive_fraction", float, 0.5, "share of tumour patches in the base patches "
           "and in every epoch", minimum=0.0, maximum=1.0, exclusive="both"),
        _s("train.positive_margin_um", float, 20.0, "tumour patches are centred at least this "
           "far inside the tumour border", unit="um", minimum=0.0, maximum=10_000.0),
        _s("train.negative_margin_um", float, 50.0, "normal patches are centred in tissue at "
           "least this far from any tumour", unit="um", minimum=0.0, maximum=10_000.0),
        _s("train.raster_mpp", float, 4.0, "spacing of the candidate patch centres and of the "
           "mining's tumour raster (coarsened on gigapixel slides)", unit="um/px", minimum=0.0,
           maximum=1000.0, exclusive="min"),
        _s("train.val_fraction", float, 0.2, "share of the training slides of each label held "
           "out for validation", minimum=0.0, maximum=1.0, exclusive="max"),
        _s("train.round_init", str, "finetune", "finetune: round k >= 2 starts from round k-1's "
           "model; scratch: every round starts afresh", choices=("finetune", "scratch")),
        _s("train.epochs", int, 3, "epochs of round 1 (of every round with round_init "
           "scratch)", minimum=1, maximum=10_000),
        _s("train.finetune_epochs", int, 2, "epochs of rounds >= 2 when fine-tuning",
           minimum=1, maximum=10_000),
        _s("train.patches_per_epoch", int, 1024, "patches drawn per epoch", minimum=2,
           maximum=100_000_000),
        _s("train.batch_size", int, 32, "patches per training step (>= 2 for BatchNorm)",
           minimum=2, maximum=65_536),
        _s("train.optimizer", str, "adam", "adam (AdamW) or sgd (Nesterov momentum)",
           choices=("adam", "sgd")),
        _s("train.lr", float, 0.001, "peak learning rate: linear warm-up, then cosine decay to "
           "5%", minimum=0.0, maximum=10.0, exclusive="min"),
        _s("train.finetune_lr_scale", float, 0.5, "rounds >= 2 fine-tune with lr times this",
           minimum=0.0, maximum=10.0, exclusive="min"),
        _s("train.momentum", float, 0.9, "SGD momentum (sgd only)", **_FRACTION),
        _s("train.weight_decay", float, 0.0001, "weight decay (not on biases and BatchNorm)",
           minimum=0.0, maximum=1.0),
        _s("train.warmup_steps", int, 10, "steps of linear learning-rate warm-up", minimum=0,
           maximum=10_000_000),
        _s("train.dropout", float, 0.2, "dropout after the head's hidden layers while training",
           minimum=0.0, maximum=1.0, exclusive="max"),
        _s("train.label_smoothing", float, 0.0, "label smoothing of the training loss (0: none)",
           minimum=0.0, maximum=0.5),
        _s("train.hard_negative_fraction", float, 0.3, "share of each epoch drawn from the hard "
           "negatives of earlier rounds", **_FRACTION),
        _s("train.val_patches", int, 256, "fixed validation patches from the held-out slides",
           minimum=0, maximum=10_000_000),
        _s("train.amp", bool, True, "mixed precision (float16 autocast + GradScaler) on CUDA; "
           "ignored on the CPU"),
        _s("train.workers", int, 2, "patch-reading DataLoader processes (the producers); 0 reads "
           "in the training process", minimum=0, maximum=256, runtime=True),
        _s("train.prefetch_factor", int, 4, "batches each loader process reads ahead",
           minimum=1, maximum=64, runtime=True),
        _s("train.threads", int, 2, "CPU threads of train_round and mine_negatives (the job's "
           "cores)", minimum=1, maximum=1024, runtime=True),
        _s("train.device", str, "auto", "auto (CUDA when there is one), cpu, cuda or cuda:N "
           "(training and mining)", **_DEVICE),
        _s("train.augment.flips", bool, True, "random horizontal flips"),
        _s("train.augment.rotate90", bool, True, "random 90-degree rotations"),
        _s("train.augment.hed_scale", float, 0.3, "HED stain augmentation (Tellez et al. 2018): "
           "each stain amount of a patch (haematoxylin, eosin, residual) is multiplied by a "
           "factor drawn from 1 +- this; 0 with hed_shift 0: off", minimum=0.0, maximum=1.0,
           exclusive="max"),
        _s("train.augment.hed_shift", float, 0.1, "... and shifted by an optical density drawn "
           "from +- this (covers white balance too)", unit="OD", minimum=0.0, maximum=1.0),
        _s("train.augment.brightness", float, 0.0, "colour jitter (optional): brightness factor "
           "drawn from 1 +- this", **_FRACTION),
        _s("train.augment.contrast", float, 0.0, "colour jitter: contrast factor drawn from "
           "1 +- this", **_FRACTION),
        _s("train.augment.saturation", float, 0.0, "colour jitter: saturation factor drawn from "
           "1 +- this", **_FRACTION),
        _s("train.augment.hue", float, 0.0, "colour jitter: hue shift drawn from +- this",
           unit="turns", minimum=0.0, maximum=0.5),
        _s("train.mine.threshold", float, 0.5, "map cells above this tumour probability outside "
           "tumour are false positives", minimum=0.0, maximum=1.0, exclusive="max"),
        _s("train.mine.margin_um", float, 75.0, "... when at least this far from tumour (the "
           "FROC hit distance)", unit="um", minimum=0.0, maximum=100_000.0),
        _s("train.mine.max_per_slide", int, 500, "hard negatives kept per slide", minimum=0,
           maximum=100_000_000),
        _s("train.mine.max_per_round", int, 2000, "hard negatives kept per round (equal "
           "per-slide shares)", minimum=0, maximum=1_000_000_000),
        _s("train.mine.block_fraction", float, 1.0, "share of each slide's ROI blocks scanned "
           "per round (1: all, as the paper)", minimum=0.0, maximum=1.0, exclusive="min"),
        _s("train.mine.amp", bool, False, "mixed precision on CUDA while mining"),
        _s("train.mine.dense_mode", str, "single", "single pass or shifted passes: the same map",
           choices=("single", "shift"), runtime=True),
        _s("train.mine.batch_size", int, 4, "blocks per device batch", minimum=1, maximum=1024,
           runtime=True),
        _s("train.mine.workers", int, 1, "block-reading processes", minimum=0, maximum=256,
           runtime=True),
        # -- stain --
        _s("stain.normalisation", str, "none", "macenko: train on slides normalised to the "
           "training cohort's reference stain (fitted per slide on a sample of its stained "
           "pixels), which model.pt keeps, so inference on any cohort normalises to it; none: "
           "train on the slides as scanned", choices=("none", "macenko")),
    )
}  # fmt: skip

#: Keys no stage record holds: what the workflow does with them (:mod:`wsiscan.dag`).
WIRING: dict[str, str] = {
    "samples": "the slides of every per-slide job",
    "scan.roi_side_px": "converted to scan.n when the config is validated",
    "model.checkpoint": "the model file check_model checks and infer reads; set, no training "
    "job exists",
    "model.imagenet_weights": "an input of init_model and of the first train_round",
    "train.rounds": "which train_round and mine_negatives jobs exist",
    "train.round_init": "train_round's starting model (round plan)",
    "train.finetune_epochs": "train_round's epochs in fine-tuning rounds (round plan)",
    "train.finetune_lr_scale": "train_round's lr in fine-tuning rounds (round plan)",
    "evaluate.every_round": "which infer, stitch, detect and evaluate jobs of earlier rounds exist",
    "summarise.truth": "an input file of summarise (true categories and pN stages)",
}

#: Config keys renamed since 0.1 (old key: new key), named in the error for an old config.
RENAMED = {
    "tissue.closing_um": "tissue.closing_diameter_um",
    "stitch.opening_um": "stitch.opening_radius_um",
    "stitch.closing_um": "stitch.closing_radius_um",
    "train.samples": "train.n_patches",
    "train.samples_per_epoch": "train.patches_per_epoch",
    "train.val_samples": "train.val_patches",
}


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in a validated config (its default when absent)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return SETTINGS[key].default
        node = node[part]
    return node


# -- stage parameter records -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Key:
    key: str | None


def key(config_key: str | None = None) -> Any:
    """A record field backed by ``config_key`` (default: the record's section + the field name)."""
    return _Key(config_key)


R = TypeVar("R")


class StageParams:
    """Base of the stage records: construction checks every field against its setting.

    ``STAGE`` is the stage (rule, command, function, log folder and failure-record name).
    """

    STAGE: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec = f.metadata["setting"]
            try:
                value = spec.check(getattr(self, f.name))
            except ValueError as exc:
                raise ConfigError(f"{spec.key}: {exc}") from None
            object.__setattr__(self, f.name, value)

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """``{field name: its setting}``, in field order."""
        return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_config(cls: type[R], config: Mapping[str, Any], **override: Any) -> R:
        """The record of a validated config (``override``: field values that replace it)."""
        values = {n: config_value(config, s.key) for n, s in cls.settings().items()}  # type: ignore[attr-defined]
        values.update(override)
        return cls(**values)

    def replace(self: R, **changes: Any) -> R:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def stage_params(stage: str, section: str) -> Any:
    """Class decorator: a frozen dataclass whose :func:`key` fields take default, help and limits
    from :data:`SETTINGS`."""

    def wrap(cls: type) -> type:
        for name in cls.__annotations__:
            marker = cls.__dict__.get(name)
            if not isinstance(marker, _Key):
                raise TypeError(f"{cls.__name__}.{name} must be declared with key()")
            spec = SETTINGS[marker.key or f"{section}.{name}"]
            if spec.name != name:
                raise TypeError(f"{cls.__name__}.{name}: the field must be named {spec.name!r}")
            setattr(cls, name, dataclasses.field(default=spec.default, metadata={"setting": spec}))
        cls.STAGE = stage
        return dataclass(frozen=True)(cls)

    return wrap


@stage_params("synth_slide", "demo")
class SynthSlideParams(StageParams):
    """Stage ``synth_slide``: one synthetic demo slide."""

    seed: int = key()
    width_px: int = key()
    height_px: int = key()
    mpp: float = key()
    size_jitter: float = key()
    workers: int = key()


@stage_params("tissue_mask", "tissue")
class TissueMaskParams(StageParams):
    """Stage ``tissue_mask``: the Otsu tissue mask and its QC picture."""

    mpp_fallback: float | None = key("slide.mpp_fallback")
    target_mpp: float = key()
    method: str = key()
    closing_diameter_um: float = key()
    min_area_um2: float = key()
    hole_area_um2: float = key()
    min_saturation: float = key()
    min_darkness: float = key()
    min_contrast: float = key()
    artefact_filter: bool = key()
    artefact_hue_range: tuple[float, float] = key()
    dark_max_value: float = key()


@stage_params("roi_grid", "scan")
class RoiGridParams(StageParams):
    """Stage ``roi_grid``: the blocks of the network's geometry over the tissue."""

    arch: str = key()
    n: int = key()
    alpha: int = key()
    min_tissue_fraction: float = key()


@stage_params("init_model", "model")
class InitModelParams(StageParams):
    """Stage ``init_model``: an untrained checkpoint (``train.rounds: 0``)."""

    arch: str = key("scan.arch")
    width: float = key()
    batchnorm: bool = key()
    seed: int = key()


@stage_params("check_model", "scan")
class CheckModelParams(StageParams):
    """Stage ``check_model``: the checkpoint inference uses loads and scans this geometry."""

    arch: str = key()
    n: int = key()
    alpha: int = key()


@stage_params("infer", "infer")
class InferParams(StageParams):
    """Stage ``infer``: dense tiles for every ROI block."""

    amp: bool = key()
    tile_dtype: str = key()
    dense_mode: str = key()
    batch_size: int = key()
    workers: int = key()
    device: str = key()


@stage_params("stitch", "stitch")
class StitchParams(StageParams):
    """Stage ``stitch``: the slide map and its lesion mask."""

    threshold: float = key()
    opening_radius_um: float = key()
    closing_radius_um: float = key()
    confine_to_tissue: bool = key()
    tissue_margin_um: float = key()


@stage_params("detect", "detect")
class DetectParams(StageParams):
    """Stage ``detect``: lesion points, slide score, region exports."""

    method: str = key()
    threshold: float = key()
    nms_radius_um: float = key()
    min_area_um2: float = key()
    outline_levels: tuple[float, ...] = key()
    tumour_groups: tuple[str, ...] = key("annotation.tumour_groups")
    exclusion_groups: tuple[str, ...] = key("annotation.exclusion_groups")


@stage_params("evaluate", "evaluate")
class EvaluateParams(StageParams):
    """Stage ``evaluate``: FROC and slide AUC of the cohort."""

    split: str = key()
    exclude: tuple[str, ...] = key()
    fp_on_negative_only: bool = key()
    interpolation: str = key()
    bootstrap: int = key()
    seed: int = key()
    allow_missing: bool = key()
    tumour_groups: tuple[str, ...] = key("annotation.tumour_groups")
    exclusion_groups: tuple[str, ...] = key("annotation.exclusion_groups")
    method: str = key("operating.method")
    target_sensitivity: float = key("operating.target_sensitivity")


@stage_params("summarise", "summarise")
class SummariseParams(StageParams):
    """Stage ``summarise``: the cohort summary, patients' pN stages and their evaluation."""

    split: str = key("evaluate.split")
    method: str = key("operating.method")
    target_sensitivity: float = key("operating.target_sensitivity")
    threshold: float | None = key("operating.threshold")


@stage_params("round_summary", "evaluate")
class RoundSummaryParams(StageParams):
    """Stage ``round_summary``: the cohort figures of every training round side by side."""


@stage_params("train_patches", "train")
class TrainPatchesParams(StageParams):
    """Stage ``train_patches``: the base training patch centres."""

    arch: str = key("scan.arch")
    n_patches: int = key()
    positive_fraction: float = key()
    positive_margin_um: float = key()
    negative_margin_um: float = key()
    raster_mpp: float = key()
    val_fraction: float = key()
    seed: int = key()
    tumour_groups: tuple[str, ...] = key("annotation.tumour_groups")
    exclusion_groups: tuple[str, ...] = key("annotation.exclusion_groups")


@stage_params("train_round", "train")
class TrainRoundParams(StageParams):
    """Stage ``train_round``: one training round. ``epochs`` and ``lr`` are the round's own
    (the workflow passes ``finetune_epochs`` and the scaled rate to fine-tuning rounds)."""

    arch: str = key("scan.arch")
    width: float = key("model.width")
    batchnorm: bool = key("model.batchnorm")
    epochs: int = key()
    lr: float = key()
    patches_per_epoch: int = key()
    batch_size: int = key()
    optimizer: str = key()
    momentum: float = key()
    weight_decay: float = key()
    warmup_steps: int = key()
    dropout: float = key()
    label_smoothing: float = key()
    positive_fraction: float = key()
    hard_negative_fraction: float = key()
    val_patches: int = key()
    flips: bool = key("train.augment.flips")
    rotate90: bool = key("train.augment.rotate90")
    hed_scale: float = key("train.augment.hed_scale")
    hed_shift: float = key("train.augment.hed_shift")
    brightness: float = key("train.augment.brightness")
    contrast: float = key("train.augment.contrast")
    saturation: float = key("train.augment.saturation")
    hue: float = key("train.augment.hue")
    normalisation: str = key("stain.normalisation")
    amp: bool = key()
    seed: int = key()
    workers: int = key()
    prefetch_factor: int = key()
    threads: int = key()
    device: str = key()

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.patches_per_epoch // self.batch_size)

    def result_fields(self) -> dict[str, Any]:
        """The fields that can change the trained model (not the run-time ones)."""
        return result_fields(self)


@stage_params("mine_negatives", "train.mine")
class MineNegativesParams(StageParams):
    """Stage ``mine_negatives``: false positives of a round's model as hard negatives."""

    threshold: float = key()
    margin_um: float = key()
    max_per_slide: int = key()
    max_per_round: int = key()
    block_fraction: float = key()
    raster_mpp: float = key("train.raster_mpp")
    amp: bool = key()
    seed: int = key("train.seed")
    tumour_groups: tuple[str, ...] = key("annotation.tumour_groups")
    exclusion_groups: tuple[str, ...] = key("annotation.exclusion_groups")
    dense_mode: str = key()
    batch_size: int = key()
    workers: int = key()
    threads: int = key("train.threads")
    device: str = key("train.device")


#: The record of every stage, by stage name.
STAGE_PARAMS: dict[str, type[StageParams]] = {
    cls.STAGE: cls
    for cls in (
        SynthSlideParams,
        TissueMaskParams,
        RoiGridParams,
        InitModelParams,
        CheckModelParams,
        InferParams,
        StitchParams,
        DetectParams,
        EvaluateParams,
        RoundSummaryParams,
        SummariseParams,
        TrainPatchesParams,
        TrainRoundParams,
        MineNegativesParams,
    )
}


def result_fields(record: StageParams) -> dict[str, Any]:
    """``{field: value}`` of the fields of ``record`` that can change an output."""
    return {
        name: getattr(record, name) for name, spec in record.settings().items() if not spec.runtime
    }


# -- command-line tokens ---------------------------------------------------------------------------
def option_name(field: str) -> str:
    """``--batch-size`` for field ``batch_size``."""
    return "--" + field.replace("_", "-")


NULL_TOKEN = "none"  # noqa: S105 (the spelling of null on the command line)


def to_argv(record_cls: type[StageParams], values: Mapping[str, Any]) -> list[str]:
    """``wsiscan <stage>`` options that set the fields ``values`` (booleans as ``--x``/``--no-x``,
    lists as several values, null as ``none``)."""
    specs = record_cls.settings()
    argv: list[str] = []
    for name, value in values.items():
        spec = specs[name]
        value = spec.check(value)
        opt = option_name(name)
        if spec.kind is bool:
            argv.append(opt if value else "--no-" + opt[2:])
        elif value is None:
            argv += [opt, NULL_TOKEN]
        elif spec.kind in (list, tuple):
            argv += [opt, *(_token(v) for v in value)]
        else:
            argv += [opt, _token(value)]
    return argv


def _token(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
