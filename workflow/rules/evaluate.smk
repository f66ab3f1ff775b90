# Cohort evaluation by the Camelyon16 protocol: FROC, slide AUC, bootstrap CIs, plots, submission.


rule evaluate:
    input:
        sheet=config["samples"],
        lesions=expand("results/{slide}/lesions.csv", slide=labelled_slides()),
        scores=expand("results/{slide}/score.json", slide=labelled_slides()),
        probmaps=expand("results/{slide}/probmap.h5", slide=labelled_slides()),
        annotations=[a for a in SAMPLES.loc[labelled_slides(), "annotation"] if a],
    output:
        metrics="results/cohort/metrics.json",
        froc="results/cohort/froc.csv",
        roc="results/cohort/roc.csv",
        slides="results/cohort/slides.csv",
        froc_png=report(
            "results/cohort/froc.png",
            caption="../report/froc.rst",
            category="Evaluation",
        ),
        roc_png=report(
            "results/cohort/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
        ),
        submission=directory("results/cohort/submission"),
    log:
        "results/logs/evaluate/cohort.log",
    benchmark:
        "results/benchmarks/evaluate/cohort.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        split=EVAL["split"],
        exclude=EVAL["exclude"],
        fp_on_negative_only=(
            "--froc-fp-on-negative-only" if EVAL["fp_on_negative_only"] else []
        ),
        interpolation=EVAL["interpolation"],
        bootstrap=EVAL["bootstrap"],
        seed=EVAL["seed"],
        allow_missing="--allow-missing" if EVAL["allow_missing"] else [],
    shell:
        "wsiscan evaluate --sheet {input.sheet:q} --results results --out results/cohort"
        " --split {params.split} --exclude {params.exclude:q} {params.fp_on_negative_only}"
        " --interpolation {params.interpolation} --bootstrap {params.bootstrap}"
        " --seed {params.seed} {params.allow_missing} > {log:q} 2>&1"
