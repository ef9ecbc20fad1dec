# The learnable-input length study (config `length_generalisation`): one table and one figure over
# its experiments' runs, whose training and evaluate jobs are the ordinary ones (finetune,
# evaluate). `snakemake -c all length_generalisation` builds it.


localrules:
    length_generalisation_report,
    length_generalisation,


rule length_generalisation_report:
    input:
        metrics=length_study_metrics(),
        readings=length_study_readings(),
        definitions=length_study_definitions(),
    output:
        csv=report(f"{RESULTS}/tables/{LENGTH_STUDY}.csv", caption="../report/length_generalisation.rst",
                   category="Tables"),
        md=report(f"{RESULTS}/tables/{LENGTH_STUDY}.md", caption="../report/length_generalisation.rst",
                  category="Tables"),
        figure=report(f"{RESULTS}/figures/{LENGTH_STUDY}.png", caption="../report/length_generalisation.rst",
                      category="Figures"),
    log:
        f"{RESULTS}/logs/tables/{LENGTH_STUDY}.log",
    conda:
        "../envs/mambapeft.yaml"
    shell:
        "mambapeft length-generalisation --readings {input.readings} --csv {output.csv} --md {output.md}"
        " --figure {output.figure} {input.metrics} > {log} 2>&1"


rule length_generalisation:
    input:
        **length_study_outputs(),
