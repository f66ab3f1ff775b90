# Embedded demo cohort: a pyramidal TIFF and its ASAP XML per demo slide of the sheet.


rule synth_slide:
    output:
        slide="data/demo/{slide}.tif",
        xml="data/demo/{slide}.xml",
    log:
        "results/logs/synth_slide/{slide}.log",
    benchmark:
        "results/benchmarks/synth_slide/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        label=lambda w: "tumor" if slide_row(w)["label"] == "tumor" else "normal",
        seed=config["demo"]["seed"],
        width_px=config["demo"]["width_px"],
        height_px=config["demo"]["height_px"],
        mpp=config["demo"]["mpp"],
    shell:
        "wsiscan synth --slide-id {wildcards.slide:q} --label {params.label} --seed {params.seed}"
        " --width-px {params.width_px} --height-px {params.height_px} --mpp {params.mpp}"
        " --out-slide {output.slide:q} --out-xml {output.xml:q} > {log:q} 2>&1"
