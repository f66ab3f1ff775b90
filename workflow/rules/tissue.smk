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
        settings=settings("tissue_mask"),
        runtime=runtime("tissue_mask"),
    shell:
        wsiscan(
            "tissue_mask"
            " --slide-id {wildcards.slide:q} --slide {input.slide:q}"
            " --out-mask {output.mask:q} --out-qc {output.qc:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1",
            failure_record="mask",
        )
