# Cohort evaluation by the Camelyon16 protocol: FROC, slide AUC, bootstrap CIs, plots, submission.


# With evaluate.allow_missing, slides whose per-slide job failed before (results/{slide}/FAILED.json
# newer than their slide file) are left out of the inputs; metrics.json lists them as missing.
rule evaluate:
    input:
        sheet=config["samples"],
        lesions=expand("results/{slide}/lesions.csv", slide=evaluated_slides()),
        scores=expand("results/{slide}/score.json", slide=evaluated_slides()),
        probmaps=expand("results/{slide}/probmap.h5", slide=evaluated_slides()),
        annotations=[a for a in SAMPLES.loc[evaluated_slides(), "annotation"] if a],
        model=model_file(),
    output:
        metrics=report(
            "results/cohort/metrics.json",
            caption="../report/metrics.rst",
            category="Evaluation",
        ),
        froc="results/cohort/froc.csv",
        roc="results/cohort/roc.csv",
        slides=report(
            "results/cohort/slides.csv",
            caption="../report/slides.rst",
            category="Evaluation",
        ),
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
        settings=settings("evaluate"),
        runtime=runtime("evaluate"),
        config_checksum=provenance(CONFIG_CHECKSUM),
        failed=evaluation_failed_args(),
    # the folders are those of the outputs (results/cohort in results/; results/rounds/round{k}/
    # cohort for an earlier round): command text, not parameters, so the report lists none
    shell:
        wsiscan(
            "evaluate --sheet {input.sheet:q} --model {input.model:q}"
            ' --out-dir "$(dirname {output.metrics:q})"'
            ' --results-dir "$(dirname "$(dirname {output.metrics:q})")"'
            " --config-checksum {params.config_checksum} {params.failed:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
