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
        arch=config["scan"]["arch"],
        n=config["scan"]["n"],
        alpha=config["scan"]["alpha"],
        min_tissue_fraction=config["scan"]["min_tissue_fraction"],
        mpp_fallback=mpp_fallback_arg,
        failure_record=failure_record,
    shell:
        "wsiscan --failure-record {params.failure_record:q} grid"
        " --slide {input.slide:q} --slide-id {wildcards.slide:q} --mask {input.mask:q}"
        " --out {output.rois:q} --arch {params.arch} --n {params.n} --alpha {params.alpha}"
        " --min-tissue-fraction {params.min_tissue_fraction} {params.mpp_fallback} > {log:q} 2>&1"
