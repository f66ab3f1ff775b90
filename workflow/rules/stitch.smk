# Dense tiles into the slide-level probability map (chunked HDF5) plus morphology and a heat map.


rule stitch:
    input:
        slide=slide_path,
        tiles="results/{slide}/tiles.h5",
        mask="results/{slide}/tissue.png",
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
        settings=settings("stitch"),
        runtime=runtime("stitch"),
        failure_record=failure_record,
    shell:
        wsiscan(
            "--failure-record {params.failure_record:q} stitch"
            " --slide-id {wildcards.slide:q} --slide {input.slide:q} --tiles {input.tiles:q}"
            " --mask {input.mask:q} --out-probmap {output.probmap:q} --out-qc {output.qc:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
