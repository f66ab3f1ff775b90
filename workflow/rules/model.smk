# Untrained model (random or ImageNet-initialised trunk), used when train.rounds is 0.


rule init_model:
    input:
        weights=lambda w: config["model"]["imagenet_weights"] or [],
    output:
        model="results/model/init.pt",
    log:
        "results/logs/init_model/init.log",
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        settings=settings("init_model"),
        runtime=runtime("init_model"),
        weights=lambda w, input: (
            ["--imagenet-weights", input.weights] if input.weights else []
        ),
    shell:
        wsiscan(
            "init_model --out-model {output.model:q} {params.weights:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
