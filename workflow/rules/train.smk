# One job per run: fine-tune (resuming from the run's checkpoint if a previous attempt was
# interrupted), write the adapter and then train.json, the training record. Evaluation is its own
# rule (evaluate.smk), so a new eval task or metric never re-trains.


rule finetune:
    input:
        unpack(train_inputs),
    output:
        record=f"{RUN_DIR}/train.json",
    log:
        f"{RUN_DIR}/train.log",
    benchmark:
        f"{RUN_DIR}/train.benchmark.tsv"
    params:
        spec=training_spec,
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
        "mambapeft train --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"
