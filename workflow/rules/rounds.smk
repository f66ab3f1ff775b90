# Every training round evaluated (evaluate.every_round): the model of each earlier round k scans
# the evaluated split into results/rounds/round{k}/ with the same per-slide stages (rules
# inherited, only the files differ) and is evaluated there; rounds.tsv sets the rounds side by
# side (false positives per normal slide, sensitivity at 0.25 and 0.5 FP per slide, FROC, AUC).


use rule infer as infer_round with:
    input:
        slide=slide_path,
        rois="results/{slide}/rois.h5",
        model="results/train/round{round}/model.pt",
    output:
        tiles="results/rounds/round{round}/{slide}/tiles.h5",
    log:
        "results/logs/infer_round/round{round}/{slide}.log",
    benchmark:
        "results/benchmarks/infer_round/round{round}/{slide}.tsv"
    params:
        settings=settings("infer"),
        runtime=runtime("infer"),


use rule stitch as stitch_round with:
    input:
        tiles="results/rounds/round{round}/{slide}/tiles.h5",
        mask="results/{slide}/tissue.png",
    output:
        probmap="results/rounds/round{round}/{slide}/probmap.h5",
    log:
        "results/logs/stitch_round/round{round}/{slide}.log",
    benchmark:
        "results/benchmarks/stitch_round/round{round}/{slide}.tsv"
    params:
        settings=settings("stitch"),
        runtime=runtime("stitch"),


use rule detect as detect_round with:
    input:
        probmap="results/rounds/round{round}/{slide}/probmap.h5",
        slide=slide_path,
        mask="results/{slide}/tissue.png",
        annotation=slide_annotation,
    output:
        lesions="results/rounds/round{round}/{slide}/lesions.csv",
        score="results/rounds/round{round}/{slide}/score.json",
        geojson="results/rounds/round{round}/{slide}/lesions.geojson",
        xml="results/rounds/round{round}/{slide}/lesions.xml",
        outlines="results/rounds/round{round}/{slide}/outlines.geojson",
        overlay="results/rounds/round{round}/{slide}/probmap.tif",
        qc="results/rounds/round{round}/{slide}/qc/heatmap.png",
    log:
        "results/logs/detect_round/round{round}/{slide}.log",
    benchmark:
        "results/benchmarks/detect_round/round{round}/{slide}.tsv"
    params:
        settings=settings("detect"),
        runtime=runtime("detect"),
        annotation=annotation_args,


use rule evaluate as evaluate_round with:
    input:
        sheet=config["samples"],
        lesions=expand(
            "results/rounds/round{{round}}/{slide}/lesions.csv",
            slide=evaluated_slides(),
        ),
        scores=expand(
            "results/rounds/round{{round}}/{slide}/score.json",
            slide=evaluated_slides(),
        ),
        probmaps=expand(
            "results/rounds/round{{round}}/{slide}/probmap.h5",
            slide=evaluated_slides(),
        ),
        annotations=[a for a in SAMPLES.loc[evaluated_slides(), "annotation"] if a],
        model="results/train/round{round}/model.pt",
    output:
        metrics="results/rounds/round{round}/cohort/metrics.json",
        froc="results/rounds/round{round}/cohort/froc.csv",
        roc="results/rounds/round{round}/cohort/roc.csv",
        slides="results/rounds/round{round}/cohort/slides.csv",
        froc_png="results/rounds/round{round}/cohort/froc.png",
        roc_png="results/rounds/round{round}/cohort/roc.png",
        submission=directory("results/rounds/round{round}/cohort/submission"),
    log:
        "results/logs/evaluate_round/round{round}.log",
    benchmark:
        "results/benchmarks/evaluate_round/round{round}.tsv"
    params:
        settings=settings("evaluate"),
        runtime=runtime("evaluate"),
        config_checksum=provenance(CONFIG_CHECKSUM),
        failed=evaluation_failed_args(),


rule round_summary:
    input:
        metrics=round_metrics(),
    output:
        rounds=report(
            "results/cohort/rounds.tsv",
            caption="../report/rounds.rst",
            category="Evaluation",
        ),
    log:
        "results/logs/round_summary/rounds.log",
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=settings("round_summary"),
        runtime=runtime("round_summary"),
    shell:
        wsiscan(
            "round_summary --metrics {input.metrics:q} --out-rounds {output.rounds:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
