# Dense FCN inference over the ROI blocks of one slide (GPU when there is one).


rule infer:
    input:
        slide=slide_path,
        rois="results/{slide}/rois.h5",
        model=model_file(),
        checked=model_check(),
    output:
        tiles="results/{slide}/tiles.h5",
    log:
        "results/logs/infer/{slide}.log",
    benchmark:
        "results/benchmarks/infer/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: max(1, config["infer"]["workers"])
    resources:
        mem_mb=memory_mb("infer"),
        runtime=lambda w, attempt: 60 * attempt,
        gpu=1 if config["infer"]["device"] != "cpu" else 0,
    params:
        settings=settings("infer"),
        runtime=runtime("infer"),
    shell:
        wsiscan(
            "infer"
            " --slide-id {wildcards.slide:q} --slide {input.slide:q} --rois {input.rois:q}"
            " --model {input.model:q} --out-tiles {output.tiles:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1",
            failure_record="tiles",
        )
