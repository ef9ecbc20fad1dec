# Backbones: pretrain a mini backbone on its upstream task (source: pretrain) or check official
# weights on disk (source: official). Fine-tuning jobs depend on the manifest, so this runs once.


rule prepare_backbone:
    output:
        manifest=f"{RESOURCES}/backbones/{{backbone}}/checkpoint.json",
    log:
        f"{RESOURCES}/logs/backbones/{{backbone}}.log",
    benchmark:
        f"{RESOURCES}/logs/backbones/{{backbone}}.benchmark.tsv"
    params:
        spec=backbone_spec,
    threads: 1
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft backbone prepare --backbone {wildcards.backbone} --spec {params.spec:q}"
        " --manifest {output.manifest} 2>&1 | tee {log}"
