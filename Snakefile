# mambapeft-repro: every table and figure of the MambaPEFT reproduction is a target of this file.
# Default config = the offline mini experiment; `--configfile config/paper.yaml` = the paper's grids.
from snakemake.utils import min_version

min_version("9.8")


# A --configfile replaces the default instead of being merged into it: a deep merge would carry the
# mini experiment's method sizes and training overrides into the paper's grid.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/dt_init.smk"
include: "workflow/rules/length_generalisation.smk"
include: "workflow/rules/lm_eval_suite.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
