# One job per run: the trained adapter on its backbone, evaluated on the run's test split (vision)
# or evaluation tasks (language); metrics.json, the record tables read, is written last.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        metrics=f"{RUN_DIR}/metrics.json",
    log:
        f"{RUN_DIR}/eval.log",
    benchmark:
        f"{RUN_DIR}/eval.benchmark.tsv"
    params:
        spec=eval_spec,
    threads: config.get("threads", 1)
    resources:
        gpu=train_resources("gpus", 0),
        runtime=train_resources("runtime", 60),
        mem_mb=train_resources("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
        wandb=WANDB,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft evaluate --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"
