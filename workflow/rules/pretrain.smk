# Backbones: fetch official weights from the Hugging Face Hub where the config says how (`download:`),
# then pretrain a mini backbone on its upstream task (source: pretrain) or check official weights on
# disk (source: official). Fine-tuning jobs depend on the manifest, so this runs once.


localrules:
    download_weights,  # cluster compute nodes often have no network; the login node fetches


rule download_weights:
    output:
        record=f"{RESOURCES}/backbones/{{backbone}}/download.json",
    log:
        f"{RESOURCES}/logs/backbones/{{backbone}}.download.log",
    benchmark:
        f"{RESOURCES}/logs/backbones/{{backbone}}.download.benchmark.tsv"
    params:
        spec=backbone_download_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft backbone download --backbone {wildcards.backbone} --spec {params.spec:q}"
        " --out {output.record} 2>&1 | tee {log}"


rule prepare_backbone:
    input:
        backbone_download_record,
    output:
        manifest=f"{RESOURCES}/backbones/{{backbone}}/checkpoint.json",
    log:
        f"{RESOURCES}/logs/backbones/{{backbone}}.log",
    benchmark:
        f"{RESOURCES}/logs/backbones/{{backbone}}.benchmark.tsv"
    params:
        spec=backbone_spec,
    threads: backbone_threads
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft backbone prepare --backbone {wildcards.backbone} --threads {threads} --spec {params.spec:q}"
        " --manifest {output.manifest} 2>&1 | tee {log}"
