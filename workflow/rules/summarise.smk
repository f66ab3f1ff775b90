# The cohort summary for the pathologist, labelled or not: per slide the score, the call at the
# operating threshold, the lesions, the largest one's diameter and size category (AJCC/Camelyon17)
# and, for a failed slide, its stage and cause; per patient (sheet column patient) the pN stage,
# evaluated against supplied truth. Slides that failed before are listed, not waited for.


rule summarise:
    input:
        sheet=config["samples"],
        scores=expand("results/{slide}/score.json", slide=summarised_slides()),
        truth=config["summarise"]["truth"] or [],
    output:
        summary=report(
            "results/cohort/summary.tsv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        patients=report(
            "results/cohort/patients.tsv",
            caption="../report/patients.rst",
            category="Summary",
        ),
        staging=report(
            "results/cohort/staging.json",
            caption="../report/staging.rst",
            category="Summary",
        ),
    log:
        "results/logs/summarise/cohort.log",
    benchmark:
        "results/benchmarks/summarise/cohort.tsv"
    conda:
        WSISCAN_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        settings=settings("summarise"),
        runtime=runtime("summarise"),
        truth=summary_truth_args,
        failed=summary_failed_args(),
    shell:
        wsiscan(
            "summarise --sheet {input.sheet:q} --results-dir results"
            " --out-summary {output.summary:q} --out-patients {output.patients:q}"
            " --out-staging {output.staging:q} {params.truth:q} {params.failed:q}"
            " {params.settings:q} {params.runtime:q} > {log:q} 2>&1"
        )
