# Datasets: fetch VTAB-1k where the config says how (`download:`), write the offline stand-ins
# (source: mini) or check real data (anything else), then decode and resize VTAB images once per
# task, split and resolution.


localrules:
    download_data,  # cluster compute nodes often have no network; the login node fetches


rule download_data:
    output:
        record=f"{RESOURCES}/data/{{dataset}}/download.json",
    log:
        f"{RESOURCES}/logs/data/{{dataset}}.download.log",
    benchmark:
        f"{RESOURCES}/logs/data/{{dataset}}.download.benchmark.tsv"
    params:
        spec=dataset_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data download --spec {params.spec:q} --out {output.record} 2>&1 | tee {log}"


rule prepare_data:
    input:
        download_record,
    output:
        manifest=f"{RESOURCES}/data/{{dataset}}/manifest.json",
    log:
        f"{RESOURCES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RESOURCES}/logs/data/{{dataset}}.benchmark.tsv"
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
    benchmark:
        f"{RESOURCES}/logs/cache/{{dataset}}/{{task}}/{{split}}_{{resolution}}.benchmark.tsv"
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
