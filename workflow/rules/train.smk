# One job per run: fine-tune (resuming from the run's checkpoint if a previous attempt was
# interrupted), evaluate on the test split(s), write metrics.json last.


rule finetune:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RUN_DIR}/metrics.json",
    log:
        f"{RUN_DIR}/train.log",
    benchmark:
        f"{RUN_DIR}/benchmark.tsv"
    params:
        spec=run_spec,
    threads: config.get("threads", 1)
    resources:
        gpu=train_resources("gpus", 0),
        runtime=train_resources("runtime", 60),
        mem_mb=train_resources("mem_mb", 4000),
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft train --spec {params.spec:q} > {log} 2>&1"
