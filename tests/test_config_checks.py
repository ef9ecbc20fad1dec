"""The checks a config passes when the workflow parses it (common.smk calls runspec.validate_config):
a bad key or value fails `snakemake -n` at once, in one line naming its key and the valid choices,
rather than being ignored or failing inside a job. The torch-free registries those checks read
are the model registries."""
import pytest
import yaml
from workflow_helpers import REMOVED, REPO, TINY, set_nested

from mambapeft.runspec import (BACKBONE_IDS, DATA_SOURCES, DOMAIN_DATA_KINDS, DT_INIT_STRATEGIES, ConfigError,
                               deep_merge, load_config, validate_config)

MINI = REPO / "config" / "config.yaml"
PAPER = REPO / "config" / "paper.yaml"
SEARCH = REPO / "tests" / "config" / "search.yaml"
DT_INIT = REPO / "tests" / "config" / "dt_init.yaml"


def _config(changes: dict, *files) -> dict:
    """The merged ``files`` (default tests/config/tiny.yaml) with ``changes``: key path ('a/b/c') -> value."""
    config = {}
    for path in files or (TINY,):
        config = deep_merge(config, yaml.safe_load(path.read_text()))  # as --configfile a b merges them
    for path, value in changes.items():
        set_nested(config, path, value)
    return config


def case(name: str, changes: dict, message: str, *files):
    """A bad config: ``files`` (default tests/config/tiny.yaml) with ``changes``, and the message expected."""
    return pytest.param(changes, files, message, id=name)


CASES = [
    # the schema: its first violation
    case("unknown top-level key", {"foo": 1}, r"^top level: unknown key\(s\) \['foo'\]; valid keys: results_dir, "),
    case("wrong type", {"threads": "one"},
         r"^threads: 'one' is not of type 'integer' \(workflow/schemas/config.schema.yaml documents every key\)$"),
    case("unknown experiment key", {"experiments/vtab/epochs": 3},
         r"^experiments/vtab: unknown key\(s\) \['epochs'\]; valid keys: domain, data, "),
    case("unknown pretrain key", {"backbones/vim-mini/pretrain/stepz": 3},
         r"^backbones/vim-mini/pretrain: unknown key\(s\) \['stepz'\]; valid keys: kind, seed, "),
    case("a seed twice", {"experiments/vtab/seeds": [0, 0]}, r"^experiments/vtab/seeds: \[0, 0\] has non-unique elements"),
    case("pretrain key of the wrong type", {"backbones/mamba_16/pretrain/epochs": "ten"},
         r"^backbones/mamba_16/pretrain/epochs: 'ten' is not of type 'integer'", MINI),
    case("a value none of a oneOf's alternatives takes", {"experiments/commonsense/train/micro_batch_size": 0},
         r"^experiments/commonsense/train/micro_batch_size: 0 must be an integer >= 1 or 'auto' "
         r"\(workflow/schemas/config.schema.yaml documents every key\)$"),
    case("a list where a oneOf takes 'all' or names", {"params_table/vision": {"vim-mini": 3}},
         r"^params_table/vision/vim-mini: 3 must be 'all' or a list of strings \("),
    case("download naming both kinds of files", {"backbones/vim-s/download/allow_patterns": ["*.pth"]},
         r"^backbones/vim-s/download: give only one of `allow_patterns` or `file` \(", PAPER),
    case("download naming no file", {"backbones/vim-s/download/file": REMOVED},
         r"^backbones/vim-s/download: give one of `allow_patterns` or `file` \(", PAPER),
    case("unknown suite resource", {"lm_eval_suite/resources": {"mem_gb": 64}},
         r"^lm_eval_suite/resources: unknown key\(s\) \['mem_gb'\]; valid keys: gpus, runtime, mem_mb "
         r"\(workflow/schemas/config.schema.yaml documents every key\)$", MINI),
    # recipe overrides: the recipe's keys, and its value types
    case("unknown recipe key", {"experiments/vtab/train/epochz": 4},
         r"^experiments/vtab/train: unknown key\(s\) \['epochz'\]; valid keys: epochs, .* \(vision/recipe.yaml\)$"),
    case("unknown nested recipe key", {"experiments/vtab/train/optimizer": {"lrr": 0.1}},
         r"^experiments/vtab/train/optimizer: unknown key\(s\) \['lrr'\]; valid keys: name, lr"),
    case("language-only recipe key on vision", {"experiments/vtab/train/micro_batch_size": 4},
         r"^experiments/vtab/train: unknown key\(s\) \['micro_batch_size'\]"),
    case("recipe value of the wrong type", {"experiments/vtab/train/epochs": "ten"},
         r"^experiments/vtab/train/epochs: 'ten' must be a number, as in vision/recipe.yaml \(epochs: 100\)$"),
    case("unknown method recipe key", {"experiments/commonsense/method_overrides/lorap_x/train": {"epochz": 1}},
         r"^experiments/commonsense/method_overrides/lorap_x/train: unknown key\(s\) \['epochz'\]; "
         r".*\(language/recipe.yaml\)$"),
    case("unknown search recipe key", {"search/tiny/train/epochz": 1},
         r"^search/tiny/train: unknown key\(s\) \['epochz'\]; valid keys: epochs, ", SEARCH),
    # references, named at their own key before the methods and searches that use them
    case("undeclared backbone, not a method misfit", {"experiments/vtab/backbones": ["vim-tiny"]},
         r"^experiments/vtab/backbones: 'vim-tiny' has no entry under `backbones:` "
         r"\(declared: vim-mini, mamba-mini\)$"),
    case("unknown task of a searched experiment, not the search's", {"experiments/vtab/tasks": ["cifar_nope"]},
         r"^experiments/vtab/tasks: \['cifar_nope'\] are not tasks of vision/tasks.yaml", SEARCH),
    case("backbone unknown to the model registry",
         {"backbones/vim-foo": {"source": "official", "path": "vim.pth"}, "experiments/vtab/backbones": ["vim-foo"]},
         r"^experiments/vtab/backbones: 'vim-foo' is not a vision backbone of the model registry "
         r"\(src/mambapeft/models/\); known: vim-t, "),
    case("vision backbone in a language experiment", {"experiments/commonsense/backbones": ["vim-mini"]},
         r"^experiments/commonsense/backbones: 'vim-mini' is not a language backbone of the model registry"),
    case("data of another domain", {"experiments/vtab/data": "commonsense"},
         r"^experiments/vtab/data: data/commonsense is of kind commonsense; a vision experiment trains on data of "
         r"kind vtab$"),
    case("source unfit for the kind", {"data/vtab/source": "llm-adapters"},
         r"^data/vtab/source: 'llm-adapters' is not a source of vtab data; pick from mini, vtab-1k$"),
    # tasks of vision/tasks.yaml and language/tasks.yaml that the data holds
    case("unknown vision task", {"experiments/vtab/tasks": ["cifar_nope"]},
         r"^experiments/vtab/tasks: \['cifar_nope'\] are not tasks of vision/tasks.yaml that data/vtab \(source mini\) "
         r"holds; pick from digits, count, position, orientation$"),
    case("real VTAB task on mini data", {"experiments/vtab/tasks": ["cifar"]},
         r"^experiments/vtab/tasks: \['cifar'\] are not tasks of vision/tasks.yaml"),
    case("unknown eval task", {"experiments/commonsense/eval_tasks": ["mini_nope"]},
         r"^experiments/commonsense/eval_tasks: \['mini_nope'\] are not tasks of language/tasks.yaml commonsense that "
         r"data/commonsense \(source mini\) holds; pick from mini_arc, mini_boolq$"),
    case("no eval tasks: scored on the training set", {"experiments/math/eval_tasks": REMOVED},
         r"^experiments/math/eval_tasks: \['math_10k'\] are not tasks of language/tasks.yaml math"),
    case("eval tasks nothing reads", {"experiments/vtab/eval_tasks": ["digits"]},
         r"^experiments/vtab/eval_tasks: runs on vtab data are tested on their own task"),
    # exclude cells
    case("exclude naming no method of the experiment", {"experiments/vtab/exclude": [{"method": "lora_inproj"}]},
         r"^experiments/vtab/exclude/0/method: 'lora_inproj' is not one of this experiment's methods: linear_probe, "
         r"lorap_x, additional_scan$"),
    case("exclude naming no seed of the experiment", {"experiments/vtab/exclude": [{"seed": 7}]},
         r"^experiments/vtab/exclude/0/seed: 7 is not one of this experiment's seeds: 0$"),
    # registries: the model registry, the dt initialisations, methods.yaml, language/tasks.yaml
    case("params_table backbone unknown", {"params_table/vision": {"vim-zz": "all"}},
         r"^params_table/vision: 'vim-zz' is not a vision backbone of the model registry"),
    case("params_table method unfit", {"params_table/vision": {"vit-s": ["lorap_x"]}},
         r"^params_table/vision/vit-s: \['lorap_x'\] are not methods of vision/methods.yaml for vit-s; "
         r"pick from all, vit_"),
    case("unknown dt initialisation", {"dt_init/inits": ["uniform", "bogus"]},
         r"^dt_init/inits: \['bogus'\] are not dt initialisations of src/mambapeft/models/dt_init.py; valid: uniform, "
         r"linear_decay, linear_decay_reverse$", TINY, DT_INIT),
    case("unknown dt_init variant", {"dt_init/model/variant": "nope"},
         r"^dt_init/model/variant: 'nope' is not a language backbone of the model registry", TINY, DT_INIT),
    # hub datasets: what the download job needs
    case("hub dataset naming nothing", {"hub_datasets": {"x": {"target": "resources/x"}}},
         r"^hub_datasets/x: give one of `repo` \(a Hub dataset's files\) or `family`"),
    case("hub dataset naming no files", {"hub_datasets": {"x": {"target": "resources/x", "repo": "a/b"}}},
         r"^hub_datasets/x: give one of `allow_patterns` \(files of a/b"),
    case("hub dataset family tasks unknown",
         {"hub_datasets": {"x": {"target": "t", "family": "lm_eval_suite", "revisions": {"nope": "main"}}}},
         r"^hub_datasets/x/revisions: \['nope'\] given; name lm_eval_suite tasks of language/tasks.yaml "
         r"\(task -> Hub dataset revision\): hellaswag, "),
]


@pytest.mark.parametrize("changes, files, message", CASES)
def test_a_bad_config_is_one_line_naming_its_key(changes, files, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(_config(changes, *files))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("files", [
    ("config/config.yaml",), ("config/paper.yaml",), ("config/gpu_smoke.yaml",), ("config/multi_gpu.yaml",),
    ("tests/config/tiny.yaml",), ("tests/config/search.yaml",), ("tests/config/length_generalisation.yaml",),
    ("tests/config/tiny.yaml", "tests/config/dt_init.yaml")], ids="+".join)
def test_every_config_of_the_repository_passes(files):
    load_config(*(REPO / f for f in files))


def test_the_torch_free_registries_are_the_model_registries():
    """runspec keeps the registries' ids so that parsing a config imports no torch: a variant or dt
    initialisation registered in src/mambapeft/models/ is added there too."""
    from mambapeft.models import LM_VARIANTS, VIM_VARIANTS, VIT_VARIANTS
    from mambapeft.models.dt_init import DT_INITS

    assert BACKBONE_IDS == {"vision": (*VIM_VARIANTS, *VIT_VARIANTS), "language": tuple(LM_VARIANTS)}
    assert DT_INIT_STRATEGIES == tuple(DT_INITS)


def test_the_data_kinds_and_sources_are_the_schemas():
    data = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]["data"]
    entry = data["additionalProperties"]["properties"]
    assert set(DATA_SOURCES) == set(entry["kind"]["enum"]) == {k for kinds in DOMAIN_DATA_KINDS.values() for k in kinds}
    assert {source for sources in DATA_SOURCES.values() for source in sources} == set(entry["source"]["enum"])
