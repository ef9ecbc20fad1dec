# One job per run of an experiment with `merge: true`: the trained method folded into the backbone's
# weights (checked against the adapter model's logits), written as a transformers MambaForCausalLM
# directory (hf/) and in mamba_ssm's layout (mamba_ssm/), merge.json last. Each such backbone is also
# written as it is, in the same layouts: the base model the merged ones are compared with.


rule merge:
    input:
        unpack(merge_inputs),
    output:
        hf=directory(f"{MERGED_DIR}/hf"),
        mamba_ssm=directory(f"{MERGED_DIR}/mamba_ssm"),
        record=f"{MERGED_DIR}/merge.json",
    log:
        f"{MERGED_DIR}/merge.log",
    benchmark:
        f"{MERGED_DIR}/merge.benchmark.tsv"
    params:
        spec=merge_spec,
        out=MERGED_DIR,
    threads: config.get("threads", 1)
    resources:
        runtime=train_resources("runtime", 60),
        mem_mb=train_resources("mem_mb", 4000),
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft merge --spec {params.spec:q} --out {params.out} > {log} 2>&1"


rule export_backbone:
    input:
        unpack(export_backbone_inputs),
    output:
        hf=directory(f"{BASE_EXPORT_DIR}/hf"),
        mamba_ssm=directory(f"{BASE_EXPORT_DIR}/mamba_ssm"),
        record=f"{BASE_EXPORT_DIR}/merge.json",
    log:
        f"{RESOURCES}/logs/backbones/{{backbone}}.export.log",
    benchmark:
        f"{RESOURCES}/logs/backbones/{{backbone}}.export.benchmark.tsv"
    params:
        spec=export_backbone_spec,
        out=BASE_EXPORT_DIR,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft merge --backbone-spec {params.spec:q} --out {params.out} > {log} 2>&1"
