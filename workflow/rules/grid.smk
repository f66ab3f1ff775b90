# ROI grid: blocks laid with stride Sr = Sf*Lp so that dense tiles abut; geometry from the network.


rule roi_grid:
    input:
        slide=slide_path,
        mask="results/{slide}/tissue.png",
    output:
        rois="results/{slide}/rois.h5",
    log:
        "results/logs/roi_grid/{slide}.log",
    benchmark:
        "results/benchmarks/roi_grid/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=settings("roi_grid"),
        runtime=runtime("roi_grid"),
    shell:
        wsiscan(
            "roi_grid"
            " --slide-id {wildcards.slide:q} --slide {input.slide:q} --mask {input.mask:q}"
            " --out-rois {output.rois:q} {params.settings:q} {params.runtime:q} > {log:q} 2>&1",
            failure_record="rois",
        )
