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
        method=config["detect"]["method"],
        threshold=config["detect"]["threshold"],
        nms_radius_um=config["detect"]["nms_radius_um"],
        min_area_um2=config["detect"]["min_area_um2"],
        failure_record=failure_record,
    shell:
        "wsiscan --failure-record {params.failure_record:q} detect"
        " --probmap {input.probmap:q} --slide-id {wildcards.slide:q}"
        " --out-csv {output.lesions:q} --out-score {output.score:q}"
        " --out-geojson {output.geojson:q} --out-xml {output.xml:q} --method {params.method}"
        " --threshold {params.threshold} --nms-radius-um {params.nms_radius_um}"
        " --min-area-um2 {params.min_area_um2} > {log:q} 2>&1"
