# Otsu tissue mask on the pyramid level nearest tissue.target_mpp, with a QC picture.


rule tissue_mask:
    input:
        slide=slide_path,
    output:
        mask="results/{slide}/tissue.png",
        qc=report(
            "results/{slide}/qc/tissue.png",
            caption="../report/tissue.rst",
            category="Tissue masks",
            labels={"slide": "{slide}"},
        ),
    log:
        "results/logs/tissue_mask/{slide}.log",
    benchmark:
        "results/benchmarks/tissue_mask/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        target_mpp=config["tissue"]["target_mpp"],
        method=config["tissue"]["method"],
        closing_um=config["tissue"]["closing_um"],
        min_area_um2=config["tissue"]["min_area_um2"],
        hole_area_um2=config["tissue"]["hole_area_um2"],
        mpp_fallback=mpp_fallback_arg,
        failure_record=failure_record,
    shell:
        "wsiscan --failure-record {params.failure_record:q} mask"
        " --slide {input.slide:q} --slide-id {wildcards.slide:q}"
        " --out-mask {output.mask:q} --out-qc {output.qc:q} --target-mpp {params.target_mpp}"
        " --method {params.method} --closing-um {params.closing_um}"
        " --min-area-um2 {params.min_area_um2} --hole-area-um2 {params.hole_area_um2}"
        " {params.mpp_fallback} > {log:q} 2>&1"
