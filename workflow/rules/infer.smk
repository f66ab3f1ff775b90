# Dense FCN inference over the ROI blocks of one slide (GPU when there is one).


rule infer:
    input:
        slide=slide_path,
        rois="results/{slide}/rois.h5",
        model=model_file(),
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
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 60 * attempt,
        gpu=1 if config["infer"]["device"] != "cpu" else 0,
    params:
        batch_size=config["infer"]["batch_size"],
        workers=config["infer"]["workers"],
        device=config["infer"]["device"],
        amp="--amp" if config["infer"]["amp"] else "--no-amp",
        tile_dtype=config["infer"]["tile_dtype"],
        dense_mode=config["infer"]["dense_mode"],
        mpp_fallback=mpp_fallback_arg,
        failure_record=failure_record,
    shell:
        "wsiscan --failure-record {params.failure_record:q} infer"
        " --slide {input.slide:q} --slide-id {wildcards.slide:q} --rois {input.rois:q}"
        " --model {input.model:q} --out {output.tiles:q} --batch-size {params.batch_size}"
        " --workers {params.workers} --device {params.device} {params.amp}"
        " --tile-dtype {params.tile_dtype} --dense-mode {params.dense_mode}"
        " {params.mpp_fallback} > {log:q} 2>&1"
