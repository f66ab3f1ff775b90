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
        arch=config["scan"]["arch"],
        width=config["model"]["width"],
        batchnorm="--batchnorm" if config["model"]["batchnorm"] else "--no-batchnorm",
        seed=config["model"]["seed"],
        weights=lambda w, input: (
            ["--imagenet-weights", input.weights] if input.weights else []
        ),
    shell:
        "wsiscan init-model --out {output.model:q} --arch {params.arch} --width {params.width}"
        " {params.batchnorm} --seed {params.seed} {params.weights:q} > {log:q} 2>&1"
