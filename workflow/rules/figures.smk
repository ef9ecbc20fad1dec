# Figures read only the experiment's results table.


localrules:
    figures,


rule figures:
    input:
        table=f"{RESULTS}/tables/{{experiment}}.csv",
    output:
        scatter=report(
            f"{RESULTS}/figures/{{experiment}}_params_vs_accuracy.png",
            caption="../report/scatter.rst",
            category="Figures",
        ),
        per_task=report(
            f"{RESULTS}/figures/{{experiment}}_per_task.png", caption="../report/per_task.rst", category="Figures"
        ),
    log:
        f"{RESULTS}/logs/figures/{{experiment}}.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft figures --table {input.table} --scatter {output.scatter} --per-task {output.per_task}"
        " --title {wildcards.experiment} > {log} 2>&1"
