# Datasets: write the offline stand-ins (source: mini) or check real data (anything else), then
# decode and resize VTAB images once per task, split and resolution.


rule prepare_data:
    output:
        manifest=f"{RESOURCES}/data/{{dataset}}/manifest.json",
    log:
        f"{RESOURCES}/logs/data/{{dataset}}.log",
    params:
        spec=dataset_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data prepare --spec {params.spec:q} --manifest {output.manifest} 2>&1 | tee {log}"


rule cache_images:
    input:
        unpack(cache_source),
    output:
        cache=f"{RESOURCES}/cache/{{dataset}}/{{task}}/{{split}}_{{resolution}}.npz",
    log:
        f"{RESOURCES}/logs/cache/{{dataset}}/{{task}}/{{split}}_{{resolution}}.log",
    params:
        root=data_root,
    wildcard_constraints:
        split="train800|val200|train800val200|test",
        resolution=r"\d+",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data cache --root {params.root} --task {wildcards.task} --split {wildcards.split}"
        " --resolution {wildcards.resolution} --out {output.cache} > {log} 2>&1"
