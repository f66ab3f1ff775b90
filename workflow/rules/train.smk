# Training (Fast ScanNet): base patches, training rounds and hard-negative mining between them.
# Round k >= 2 trains on the base patches plus the hard negatives mined with rounds < k and
# starts from round k-1's model (train.round_init: finetune) or afresh. Only the last round's
# model feeds inference (model_file() in common.smk); no rule here depends on train.rounds, so
# raising it re-runs only the new rounds.
include: "train_common.smk"


rule train_patches:
    input:
        sheet=config["samples"],
        slides=train_slide_paths,
        masks=expand("results/{slide}/tissue.png", slide=train_slides()),
        annotations=train_annotations(),
    output:
        patches="results/train/patches.h5",
    log:
        "results/logs/train_patches/patches.log",
    benchmark:
        "results/benchmarks/train_patches/patches.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        settings=settings("train_patches"),
        runtime=runtime("train_patches"),
    shell:
        wsiscan(
            "train_patches --sheet {input.sheet:q} --masks {input.masks:q}"
            " --out-patches {output.patches:q} {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )


rule train_round:
    input:
        unpack(train_round_inputs),
        patches="results/train/patches.h5",
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
        mem_mb=memory_mb("train_round"),
        runtime=lambda w, attempt: 240 * attempt,
        gpu=TRAIN_GPU,
    params:
        init=round_init_args,
        settings=settings("train_round"),
        runtime=runtime("train_round"),
    shell:
        wsiscan(
            "train_round --round-index {wildcards.round}"
            " --patches {input.patches:q} --hard-negatives {input.hard_negatives:q} {params.init:q}"
            " --out-model {output.model:q} --out-metrics {output.metrics:q}"
            " --out-loss-png {output.loss_png:q} {params.settings:q} {params.runtime:q}"
            " > {log:q} 2>&1"
        )


rule mine_negatives:
    input:
        model="results/train/round{round}/model.pt",
        patches="results/train/patches.h5",
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
        mem_mb=memory_mb("mine_negatives"),
        runtime=lambda w, attempt: 120 * attempt,
        gpu=TRAIN_GPU,
    params:
        settings=settings("mine_negatives"),
        runtime=runtime("mine_negatives"),
    shell:
        wsiscan(
            "mine_negatives --round-index {wildcards.round}"
            " --patches {input.patches:q} --model {input.model:q} --rois {input.rois:q}"
            " --out-hard-negatives {output.hard_negatives:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
