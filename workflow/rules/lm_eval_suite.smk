# The Orca-Math study's lm-eval suite (config `lm_eval_suite`): the suite's task files (stand-ins
# written here, or local copies checked), one evaluation per base backbone and per fine-tuned run of
# the study's experiment (the merged model from the merge job through lm-eval's `hf`, and the same run
# as backbone + adapter through our lm-eval model on the crosscheck tasks), then the table and the
# per-task change figure. The table replaces the experiment's generic one (same file name).


rule lm_eval_suite_base:
    input:
        unpack(suite_base_inputs),
    output:
        record=f"{SUITE_DIR}/base.json",
    log:
        f"{SUITE_DIR}/base.log",
    benchmark:
        f"{SUITE_DIR}/base.benchmark.tsv"
    params:
        spec=suite_base_spec,
    threads: config.get("threads", 1)
    resources:
        gpu=suite_resource("gpus", 0),
        runtime=suite_resource("runtime", 60),
        mem_mb=suite_resource("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft lm-eval-suite evaluate --gpus {resources.gpu} --gpu-slots {resources.gpu_slots}"
        " --spec {params.spec:q} --out {output.record} > {log} 2>&1"


rule lm_eval_suite_tuned:
    input:
        unpack(suite_tuned_inputs),
    output:
        record=f"{SUITE_DIR}/{{task}}/{{method}}/seed{{seed}}.json",
    log:
        f"{SUITE_DIR}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{SUITE_DIR}/{{task}}/{{method}}/seed{{seed}}.benchmark.tsv"
    params:
        spec=suite_tuned_spec,
    threads: config.get("threads", 1)
    resources:
        gpu=suite_resource("gpus", 0),
        runtime=suite_resource("runtime", 60),
        mem_mb=suite_resource("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft lm-eval-suite evaluate --gpus {resources.gpu} --gpu-slots {resources.gpu_slots}"
        " --spec {params.spec:q} --out {output.record} > {log} 2>&1"


if LM_EVAL_SUITE:

    localrules:
        lm_eval_suite_report,

    ruleorder: lm_eval_suite_report > table

    rule lm_eval_suite_data:
        input:
            suite_data_downloads(),
        output:
            manifest=suite_data_manifest(),
        log:
            f"{RESOURCES}/logs/data/lm_eval_suite.log",
        benchmark:
            f"{RESOURCES}/logs/data/lm_eval_suite.benchmark.tsv"
        params:
            spec=suite_data_spec(),
        conda:
            "../envs/mambapeft.yaml"
        shell:
            "mambapeft lm-eval-suite data --spec {params.spec:q} --manifest {output.manifest} > {log} 2>&1"

    rule lm_eval_suite_report:
        input:
            records=suite_records(),
            readings=suite_readings(),
            definitions=suite_report_definitions(),
        output:
            **{k: report(v, caption="../report/lm_eval_suite.rst", category="Tables") for k, v in suite_outputs().items()},
        log:
            f"{RESULTS}/logs/tables/lm_eval_suite.log",
        params:
            title=suite_experiment(),
        conda:
            "../envs/mambapeft.yaml"
        shell:
            "mambapeft lm-eval-suite report --readings {input.readings} --title {params.title}"
            " --csv {output.csv} --md {output.md} --figure {output.figure} {input.records} > {log} 2>&1"
