# The hybrid PEFT search (config `search`; common.smk explains the flow). Trials and final runs are
# ordinary `mambapeft train` / `evaluate` jobs; the Optuna study is results/search/<name>/journal.log.


localrules:
    search_ask,
    search_result,
    search_report,


checkpoint search_ask:
    input:
        unpack(search_study_inputs),
    output:
        batch=f"{SEARCH_DIR}/{{step}}/batch{{batch}}.json",
    log:
        f"{SEARCH_DIR}/logs/{{step}}_ask{{batch}}.log",
    params:
        spec=search_study_spec,
        scores=search_scores,
        previous=search_previous_result,
    wildcard_constraints:
        search=SEARCH_NAMES,
        step=r"[^/]+",
        batch=r"\d+",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft search ask --spec {params.spec:q} --scores {params.scores} --previous {params.previous}"
        " --out {output.batch} > {log} 2>&1"


checkpoint search_result:
    input:
        unpack(search_study_inputs),
    output:
        result=f"{SEARCH_DIR}/{{step}}/result.json",
    log:
        f"{SEARCH_DIR}/logs/{{step}}_result.log",
    params:
        spec=search_study_spec,
        scores=search_scores,
        previous=search_previous_result,
    wildcard_constraints:
        search=SEARCH_NAMES,
        step=r"[^/]+",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft search result --spec {params.spec:q} --scores {params.scores} --previous {params.previous}"
        " --out {output.result} > {log} 2>&1"


rule search_train:
    input:
        unpack(search_train_inputs),
    output:
        record=f"{SEARCH_DIR}/{{stage}}/{{task}}/train.json",
    log:
        f"{SEARCH_DIR}/{{stage}}/{{task}}/train.log",
    benchmark:
        f"{SEARCH_DIR}/{{stage}}/{{task}}/train.benchmark.tsv"
    params:
        spec=search_training_spec,
    wildcard_constraints:
        search=SEARCH_NAMES,
        stage=r"[^/]+/trial\d+|final",
    threads: config.get("threads", 1)
    resources:
        gpu=search_resources("gpus", 0),
        runtime=search_resources("runtime", 60),
        mem_mb=search_resources("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
        wandb=WANDB,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft train --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"


rule search_evaluate:
    input:
        unpack(search_eval_inputs),
    output:
        metrics=f"{SEARCH_DIR}/{{stage}}/{{task}}/metrics.json",
    log:
        f"{SEARCH_DIR}/{{stage}}/{{task}}/eval.log",
    benchmark:
        f"{SEARCH_DIR}/{{stage}}/{{task}}/eval.benchmark.tsv"
    params:
        spec=search_eval_spec,
    wildcard_constraints:
        search=SEARCH_NAMES,
        stage=r"[^/]+/trial\d+|final",
    threads: config.get("threads", 1)
    resources:
        gpu=search_resources("gpus", 0),
        runtime=search_resources("runtime", 60),
        mem_mb=search_resources("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
        wandb=WANDB,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft evaluate --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"


rule search_report:
    input:
        results=search_results(),
        final=search_plan.final_metrics(config),
        definitions=search_report_definitions(),
    output:
        csv=f"{RESULTS}/tables/hybrid_search.csv",
        md=report(f"{RESULTS}/tables/hybrid_search.md", caption="../report/hybrid_search.rst", category="Tables"),
        figure=report(
            f"{RESULTS}/figures/hybrid_search_history.png", caption="../report/hybrid_search.rst", category="Figures"
        ),
    log:
        f"{RESULTS}/logs/tables/hybrid_search.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft search report --results {input.results} --final {input.final} --csv {output.csv} --md {output.md}"
        " --figure {output.figure} > {log} 2>&1"
