# Lesion points, slide score and exports for viewers from the probability map: regions and
# lesion candidates as QuPath GeoJSON and ASAP XML, outlines at probability levels (QuPath), the
# map as a pyramidal TIFF (OpenSlide, QuPath, ASAP), and the QC picture over the slide.


rule detect:
    input:
        probmap="results/{slide}/probmap.h5",
        slide=slide_path,
        mask="results/{slide}/tissue.png",
        annotation=slide_annotation,
    output:
        lesions="results/{slide}/lesions.csv",
        score="results/{slide}/score.json",
        geojson="results/{slide}/lesions.geojson",
        xml="results/{slide}/lesions.xml",
        outlines="results/{slide}/outlines.geojson",
        overlay="results/{slide}/probmap.tif",
        qc=report(
            "results/{slide}/qc/heatmap.png",
            caption="../report/heatmap.rst",
            category="Heat maps",
            labels={"slide": "{slide}"},
        ),
    log:
        "results/logs/detect/{slide}.log",
    benchmark:
        "results/benchmarks/detect/{slide}.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        settings=settings("detect"),
        runtime=runtime("detect"),
        annotation=annotation_args,
    shell:
        wsiscan(
            "detect --slide-id {wildcards.slide:q} --probmap {input.probmap:q}"
            " --out-lesions {output.lesions:q} --out-score {output.score:q}"
            " --out-geojson {output.geojson:q} --out-xml {output.xml:q}"
            " --out-outlines {output.outlines:q} --out-overlay {output.overlay:q}"
            " --out-qc {output.qc:q} --slide {input.slide:q} --mask {input.mask:q}"
            " {params.annotation:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1",
            failure_record="lesions",
        )
