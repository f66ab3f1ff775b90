# Dense tiles into the slide-level probability map (chunked HDF5) plus morphology; the map is
# confined to the tissue. The QC heat map is drawn by detect, over the detections.


rule stitch:
    input:
        tiles="results/{slide}/tiles.h5",
        mask="results/{slide}/tissue.png",
    output:
        probmap="results/{slide}/probmap.h5",
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
    shell:
        wsiscan(
            "stitch --slide-id {wildcards.slide:q} --tiles {input.tiles:q}"
            " --mask {input.mask:q} --out-probmap {output.probmap:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1",
            failure_record="probmap",
        )
