# Lesion points, slide score and region exports (QuPath GeoJSON, ASAP XML) from the probability map.


rule detect:
    input:
        probmap="results/{slide}/probmap.h5",
    output:
        lesions="results/{slide}/lesions.csv",
        score="results/{slide}/score.json",
        geojson="results/{slide}/lesions.geojson",
        xml="results/{slide}/lesions.xml",
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
        failure_record=failure_record,
    shell:
        wsiscan(
            "--failure-record {params.failure_record:q} detect"
            " --slide-id {wildcards.slide:q} --probmap {input.probmap:q}"
            " --out-lesions {output.lesions:q} --out-score {output.score:q}"
            " --out-geojson {output.geojson:q} --out-xml {output.xml:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
