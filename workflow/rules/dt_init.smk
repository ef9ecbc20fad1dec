# The dt_bias initialisation study (config `dt_init`): the offline stand-in corpora (when configured),
# each corpus tokenized once into a memory-mapped token array, one pretraining job and one
# perplexity job per (init, seed) (perplexity is its own job: a new evaluation setting never
# re-trains), then the table and the two figures. `snakemake -c all dt_init` builds it; the default
# target too where `dt_init.default_target` is true (config/paper.yaml).


localrules:
    dt_init_table,
    dt_init_figures,
    dt_init,


rule dt_init_standin:
    output:
        manifest=f"{RESOURCES}/data/{runspec.DT_INIT}/manifest.json",
    log:
        f"{RESOURCES}/logs/data/{runspec.DT_INIT}.log",
    benchmark:
        f"{RESOURCES}/logs/data/{runspec.DT_INIT}.benchmark.tsv"
    params:
        spec=dt_init_standin_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init standin --spec {params.spec:q} --manifest {output.manifest} > {log} 2>&1"


rule tokenize_dt_init:
    input:
        dt_init_standin_manifest,
        dt_init_corpus_downloads,
    output:
        tokens=f"{DT_INIT_TOKENS}.bin",
        meta=f"{DT_INIT_TOKENS}.json",
    log:
        f"{RESOURCES}/logs/tokens/{runspec.DT_INIT}/{{split}}.log",
    benchmark:
        f"{RESOURCES}/logs/tokens/{runspec.DT_INIT}/{{split}}.benchmark.tsv"
    params:
        spec=dt_init_tokenize_spec,
    wildcard_constraints:
        split="|".join(runspec.TEXT_LAYOUTS),
    threads: dt_init_threads()  # CPUs for the job: the tokenizer encodes each batch of documents in parallel
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init tokenize --spec {params.spec:q} --tokens {output.tokens} --meta {output.meta} > {log} 2>&1"


rule pretrain_dt_init:
    input:
        **dt_init_tokens("train"),
    output:
        record=f"{DT_INIT_RUN_DIR}/{runspec.PRETRAIN_RECORD}",
    log:
        f"{DT_INIT_RUN_DIR}/pretrain.log",
    benchmark:
        f"{DT_INIT_RUN_DIR}/pretrain.benchmark.tsv"
    params:
        spec=dt_init_pretrain_spec,
    wildcard_constraints:
        init=DT_INIT_INITS,
    threads: dt_init_threads()
    resources:
        gpu=dt_init_resource("gpus", 0),
        runtime=dt_init_resource("runtime", 60),
        mem_mb=dt_init_resource("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
        wandb=WANDB,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init pretrain --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"


rule perplexity_dt_init:
    input:
        record=f"{DT_INIT_RUN_DIR}/{runspec.PRETRAIN_RECORD}",
        **dt_init_tokens("test"),
    output:
        record=f"{DT_INIT_RUN_DIR}/{runspec.PERPLEXITY_RECORD}",
    log:
        f"{DT_INIT_RUN_DIR}/perplexity.log",
    benchmark:
        f"{DT_INIT_RUN_DIR}/perplexity.benchmark.tsv"
    params:
        spec=dt_init_perplexity_spec,
    wildcard_constraints:
        init=DT_INIT_INITS,
    threads: dt_init_threads()
    resources:
        gpu=dt_init_resource("gpus", 0),
        runtime=dt_init_resource("runtime", 60),
        mem_mb=dt_init_resource("mem_mb", 4000),
        gpu_slots=GPU_SLOTS,
        wandb=WANDB,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init perplexity --gpus {resources.gpu} --gpu-slots {resources.gpu_slots} --threads {threads}"
        " --wandb {resources.wandb:q} --spec {params.spec:q} > {log} 2>&1"


rule dt_init_table:
    input:
        records=dt_init_records(runspec.PERPLEXITY_RECORD),
    output:
        csv=report(f"{RESULTS}/tables/{runspec.DT_INIT}.csv", caption="../report/dt_init_table.rst", category="Tables"),
        md=report(f"{RESULTS}/tables/{runspec.DT_INIT}.md", caption="../report/dt_init_table.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/{runspec.DT_INIT}.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init table --csv {output.csv} --md {output.md} {input.records} > {log} 2>&1"


rule dt_init_figures:
    input:
        records=dt_init_records(runspec.PRETRAIN_RECORD),
    output:
        loss=report(f"{RESULTS}/figures/{runspec.DT_INIT}_loss.png", caption="../report/dt_init_loss.rst",
                    category="Figures"),
        dt=report(f"{RESULTS}/figures/{runspec.DT_INIT}_dt.png", caption="../report/dt_init_dt.rst",
                  category="Figures"),
    log:
        f"{RESULTS}/logs/figures/{runspec.DT_INIT}.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft dt-init figures --loss {output.loss} --dt {output.dt} {input.records} > {log} 2>&1"


rule dt_init:
    input:
        dt_init_outputs(),
