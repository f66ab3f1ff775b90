# Embedded demo cohort: a pyramidal TIFF and its ASAP XML per demo slide of the sheet, with the
# stain and scanner of the slide's centre (sheet column centre).


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
        centre=lambda w: (
            ["--centre", slide_row(w)["centre"]] if slide_row(w).get("centre") else []
        ),
        settings=settings("synth_slide"),
        runtime=runtime("synth_slide"),
    shell:
        wsiscan(
            "synth_slide --slide-id {wildcards.slide:q} --label {params.label}"
            " {params.centre:q}"
            " --out-slide {output.slide:q} --out-xml {output.xml:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
