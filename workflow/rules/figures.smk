# Figures read only the experiment's results table (the Vim-vs-ViT figure also the paper's numbers).


localrules:
    figures,
    vim_vs_vit_figure,


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


rule vim_vs_vit_figure:
    input:
        table=f"{RESULTS}/tables/{{experiment}}.csv",
        definitions=vim_vs_vit_definitions(),
    output:
        report(f"{RESULTS}/figures/{{experiment}}_vim_vs_vit.png", caption="../report/vim_vs_vit.rst", category="Figures"),
    log:
        f"{RESULTS}/logs/figures/{{experiment}}_vim_vs_vit.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft figure-vim-vs-vit --table {input.table} --out {output} > {log} 2>&1"
