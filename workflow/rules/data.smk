# Datasets: fetch VTAB-1k where the config says how (`download:`) and the Hub datasets of the
# `hub_datasets` table (each before the jobs that read its target), write the offline stand-ins
# (source: mini) or check real data (anything else), then decode and resize VTAB images once per
# task, split and resolution; tokenize a text dataset (orca_math; yelp_polarity with its labels) once
# per backbone tokenizer.


localrules:
    download_data,  # cluster compute nodes often have no network; the login node fetches
    download_hub_dataset,


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


rule download_hub_dataset:
    output:
        record=f"{RESOURCES}/downloads/{{hub_dataset}}.json",
    log:
        f"{RESOURCES}/logs/downloads/{{hub_dataset}}.log",
    benchmark:
        f"{RESOURCES}/logs/downloads/{{hub_dataset}}.benchmark.tsv"
    params:
        spec=hub_dataset_spec,
    wildcard_constraints:
        hub_dataset=hub_dataset_names(),
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data download-hub --name {wildcards.hub_dataset} --spec {params.spec:q} --out {output.record}"
        " 2>&1 | tee {log}"


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
        spec=prepare_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data prepare --spec {params.spec:q} --manifest {output.manifest} 2>&1 | tee {log}"


# The labels are checked against the task's class count (vision/tasks.yaml), which is in the spec of
# prepare_data (runspec.PREPARED_TASK_FIELDS): editing it makes the manifest again, and so these caches.
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


rule tokenize_text:
    input:
        unpack(tokenize_text_inputs),
    output:
        tokens=f"{RESOURCES}/tokens/{{dataset}}/{{backbone}}.bin",
        meta=f"{RESOURCES}/tokens/{{dataset}}/{{backbone}}.json",
    log:
        f"{RESOURCES}/logs/tokens/{{dataset}}/{{backbone}}.log",
    benchmark:
        f"{RESOURCES}/logs/tokens/{{dataset}}/{{backbone}}.benchmark.tsv"
    params:
        spec=tokenize_text_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data tokenize --spec {params.spec:q} --tokens {output.tokens} --meta {output.meta} > {log} 2>&1"


# A classification dataset (yelp_polarity): both splits tokenized once per backbone tokenizer, with
# each review's label; its training and evaluation jobs read their reviews from it.
rule tokenize_labelled:
    input:
        unpack(tokenize_text_inputs),
    output:
        tokens=f"{RESOURCES}/tokens/{{dataset}}/{{backbone}}.labelled.bin",
        labels=f"{RESOURCES}/tokens/{{dataset}}/{{backbone}}.labels.bin",
        meta=f"{RESOURCES}/tokens/{{dataset}}/{{backbone}}.labelled.json",
    log:
        f"{RESOURCES}/logs/tokens/{{dataset}}/{{backbone}}.labelled.log",
    benchmark:
        f"{RESOURCES}/logs/tokens/{{dataset}}/{{backbone}}.labelled.benchmark.tsv"
    params:
        spec=tokenize_text_spec,
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft data tokenize --spec {params.spec:q} --tokens {output.tokens} --labels {output.labels}"
        " --meta {output.meta} > {log} 2>&1"
