# Tables read the runs' metrics.json files and the domain's method, paper and task definitions.


localrules:
    table,
    params_table,


rule table:
    input:
        metrics=experiment_metrics,
        definitions=table_definitions,
    output:
        csv=report(f"{RESULTS}/tables/{{experiment}}.csv", caption="../report/table.rst", category="Tables"),
        md=report(f"{RESULTS}/tables/{{experiment}}.md", caption="../report/table.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/{{experiment}}.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft tables --experiment {wildcards.experiment} --csv {output.csv} --md {output.md}"
        " {input.metrics} > {log} 2>&1"


rule params_table:
    input:
        definitions=params_table_definitions(),
    output:
        csv=f"{RESULTS}/tables/params.csv",
        md=report(f"{RESULTS}/tables/params.md", caption="../report/params.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/params.log",
    params:
        spec=params_table_spec(),
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft params-table --spec {params.spec:q} --csv {output.csv} --md {output.md} > {log} 2>&1"
