# Training (Fast ScanNet): base patch samples, training rounds and hard-negative mining between
# them. Round k >= 2 trains on the base samples plus the hard negatives mined with rounds < k and
# starts from round k-1's model (train.round_init: finetune) or from scratch. Only the last round's
# model feeds inference (model_file() in common.smk); no rule here depends on train.rounds, so
# raising it re-runs only the new rounds.
include: "train_common.smk"


rule train_samples:
    input:
        slides=train_slide_paths,
        masks=expand("results/{slide}/tissue.png", slide=train_slides()),
        annotations=train_annotations(),
    output:
        samples="results/train/samples.h5",
    log:
        "results/logs/train_samples/samples.log",
    benchmark:
        "results/benchmarks/train_samples/samples.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        slides=train_slide_args,
        arch=config["scan"]["arch"],
        n_samples=TRAIN["samples"],
        positive_fraction=TRAIN["positive_fraction"],
        positive_margin_um=TRAIN["positive_margin_um"],
        negative_margin_um=TRAIN["negative_margin_um"],
        raster_mpp=TRAIN["raster_mpp"],
        val_fraction=TRAIN["val_fraction"],
        seed=TRAIN["seed"],
        mpp_fallback=mpp_fallback_arg,
    shell:
        "wsiscan train-samples {params.slides:q} --out {output.samples:q} --arch {params.arch}"
        " --samples {params.n_samples} --positive-fraction {params.positive_fraction}"
        " --positive-margin-um {params.positive_margin_um}"
        " --negative-margin-um {params.negative_margin_um} --raster-mpp {params.raster_mpp}"
        " --val-fraction {params.val_fraction} --seed {params.seed}"
        " {params.mpp_fallback} > {log:q} 2>&1"


rule train_round:
    input:
        unpack(train_round_inputs),
        samples="results/train/samples.h5",
    output:
        model="results/train/round{round}/model.pt",
        metrics="results/train/round{round}/metrics.json",
        loss_png=report(
            "results/train/round{round}/loss.png",
            caption="../report/loss.rst",
            category="Training",
            labels={"round": "{round}"},
        ),
    log:
        "results/logs/train_round/round{round}.log",
    benchmark:
        "results/benchmarks/train_round/round{round}.tsv"
    conda:
        WSISCAN_ENV
    threads: TRAIN["threads"]
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 240 * attempt,
        gpu=TRAIN_GPU,
    params:
        init=round_init_args,
        arch=config["scan"]["arch"],
        width=config["model"]["width"],
        batchnorm="--batchnorm" if config["model"]["batchnorm"] else "--no-batchnorm",
        epochs=round_epochs,
        lr=round_lr,
        samples_per_epoch=TRAIN["samples_per_epoch"],
        batch_size=TRAIN["batch_size"],
        optimizer=TRAIN["optimizer"],
        momentum=TRAIN["momentum"],
        weight_decay=TRAIN["weight_decay"],
        warmup_steps=TRAIN["warmup_steps"],
        dropout=TRAIN["dropout"],
        positive_fraction=TRAIN["positive_fraction"],
        hard_negative_fraction=TRAIN["hard_negative_fraction"],
        val_samples=TRAIN["val_samples"],
        augment=[
            "--flips" if TRAIN["augment"]["flips"] else "--no-flips",
            "--rotate90" if TRAIN["augment"]["rotate90"] else "--no-rotate90",
            "--brightness",
            TRAIN["augment"]["brightness"],
            "--contrast",
            TRAIN["augment"]["contrast"],
            "--saturation",
            TRAIN["augment"]["saturation"],
            "--hue",
            TRAIN["augment"]["hue"],
        ],
        workers=TRAIN["workers"],
        device=TRAIN["device"],
        amp="--amp" if TRAIN["amp"] else "--no-amp",
        seed=TRAIN["seed"],
        mpp_fallback=mpp_fallback_arg,
    shell:
        "wsiscan train-round --round {wildcards.round} --samples {input.samples:q}"
        " --hard-negatives {input.hard_negatives:q} {params.init:q}"
        " --out-model {output.model:q} --out-metrics {output.metrics:q}"
        " --out-loss-png {output.loss_png:q} --arch {params.arch} --width {params.width}"
        " {params.batchnorm} --epochs {params.epochs} --lr {params.lr}"
        " --samples-per-epoch {params.samples_per_epoch} --batch-size {params.batch_size}"
        " --optimizer {params.optimizer} --momentum {params.momentum}"
        " --weight-decay {params.weight_decay} --warmup-steps {params.warmup_steps}"
        " --dropout {params.dropout} --positive-fraction {params.positive_fraction}"
        " --hard-negative-fraction {params.hard_negative_fraction}"
        " --val-samples {params.val_samples} {params.augment} --workers {params.workers}"
        " --threads {threads} --device {params.device} {params.amp} --seed {params.seed}"
        " {params.mpp_fallback} > {log:q} 2>&1"


rule mine_negatives:
    input:
        model="results/train/round{round}/model.pt",
        samples="results/train/samples.h5",
        slides=train_slide_paths,
        rois=expand("results/{slide}/rois.h5", slide=train_slides()),
        annotations=train_annotations(),
    output:
        hard_negatives="results/train/round{round}/hard_negatives.h5",
    log:
        "results/logs/mine_negatives/round{round}.log",
    benchmark:
        "results/benchmarks/mine_negatives/round{round}.tsv"
    conda:
        WSISCAN_ENV
    threads: TRAIN["threads"]
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 120 * attempt,
        gpu=TRAIN_GPU,
    params:
        threshold=MINE["threshold"],
        margin_um=MINE["margin_um"],
        max_per_slide=MINE["max_per_slide"],
        max_per_round=MINE["max_per_round"],
        raster_mpp=TRAIN["raster_mpp"],
        block_fraction=MINE["block_fraction"],
        batch_size=MINE["batch_size"],
        workers=MINE["workers"],
        device=TRAIN["device"],
        amp="--amp" if config["infer"]["amp"] else "--no-amp",
        dense_mode=config["infer"]["dense_mode"],
        seed=TRAIN["seed"],
        mpp_fallback=mpp_fallback_arg,
    shell:
        "wsiscan mine-negatives --round {wildcards.round} --samples {input.samples:q}"
        " --model {input.model:q} --rois {input.rois:q} --out {output.hard_negatives:q}"
        " --threshold {params.threshold} --margin-um {params.margin_um}"
        " --max-per-slide {params.max_per_slide} --max-per-round {params.max_per_round}"
        " --raster-mpp {params.raster_mpp} --block-fraction {params.block_fraction}"
        " --batch-size {params.batch_size}"
        " --workers {params.workers} --threads {threads} --device {params.device} {params.amp}"
        " --dense-mode {params.dense_mode} --seed {params.seed}"
        " {params.mpp_fallback} > {log:q} 2>&1"
