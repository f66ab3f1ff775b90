# Dense tiles into the slide-level probability map (chunked HDF5) plus morphology and a heat map.


rule stitch:
    input:
        slide=slide_path,
        tiles="results/{slide}/tiles.h5",
    output:
        probmap="results/{slide}/probmap.h5",
        qc=report(
            "results/{slide}/qc/heatmap.png",
            caption="../report/heatmap.rst",
            category="Heat maps",
            labels={"slide": "{slide}"},
        ),
    log:
        "results/logs/stitch/{slide}.log",
    benchmark:
        "results/benchmarks/stitch/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 3000 * attempt,
        runtime=lambda w, attempt: 20 * attempt,
    params:
        threshold=config["stitch"]["threshold"],
        opening_um=config["stitch"]["opening_um"],
        closing_um=config["stitch"]["closing_um"],
        mpp_fallback=mpp_fallback_arg,
        failure_record=failure_record,
    shell:
        "wsiscan --failure-record {params.failure_record:q} stitch"
        " --slide {input.slide:q} --slide-id {wildcards.slide:q}"
        " --tiles {input.tiles:q} --out {output.probmap:q} --qc {output.qc:q}"
        " --threshold {params.threshold} --opening-um {params.opening_um}"
        " --closing-um {params.closing_um} {params.mpp_fallback} > {log:q} 2>&1"
