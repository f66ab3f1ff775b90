# Untrained model (random or ImageNet-initialised trunk), used when train.rounds is 0, and the
# check of the model inference uses, which every infer job waits for.


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


# One cheap CPU job before any infer job: a bad model.checkpoint (not a torch file, truncated,
# another architecture, NaN weights) fails here, and no slide's tiles.h5 is removed.
rule check_model:
    input:
        model=model_file(),
    output:
        record=dag.model_check_record(config),
    log:
        "results/logs/check_model/check.log",
    benchmark:
        "results/benchmarks/check_model/check.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        settings=settings("check_model"),
        runtime=runtime("check_model"),
    shell:
        wsiscan(
            "check_model --model {input.model:q} --out-record {output.record:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
