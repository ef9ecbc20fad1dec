"""Bad inputs, tried as a new user would: published checkpoint layouts and data roots, broken.

Every case drives the command line and expects exit 2, one ``mambapeft: error:`` line naming the
file (or key) and the problem, no traceback, and no manifest written.
"""
import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from mambapeft.cli import main
from mambapeft.data import mini_text
from mambapeft.data.errors import DataError
from mambapeft.data.instruct import read_instruct_json
from mambapeft.models import build_model
from mambapeft.models.checkpoints import build_lm_from_dir, save_lm, save_vim

# The official mamba-130m config.json (state-spaces/mamba-130m), as downloaded.
MAMBA_130M_CONFIG = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                     "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one error line holding every needle."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("mambapeft: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def prepare_argv(backbone: str, path, manifest) -> list[str]:
    spec = json.dumps({"source": "official", "path": str(path)})
    return ["backbone", "prepare", "--backbone", backbone, "--spec", spec, "--manifest", str(manifest)]


def prepare_refused(capsys, tmp_path, backbone: str, path, *needles: str) -> str:
    manifest = tmp_path / "manifest" / "checkpoint.json"
    line = refused(capsys, prepare_argv(backbone, path, manifest), *needles)
    assert not manifest.exists() and not manifest.parent.exists()
    return line


def prepared(capsys, tmp_path, backbone: str, path) -> dict:
    manifest = tmp_path / "checkpoint.json"
    assert main(prepare_argv(backbone, path, manifest)) == 0, capsys.readouterr().err
    return json.loads(manifest.read_text())


def mini_vim_state() -> dict:
    return build_model("vim-mini", num_classes=1000).state_dict()


def mini_lm_dir(path, **overrides):
    """mamba-mini in the state-spaces/mamba-* layout (config.json + pytorch_model.bin)."""
    model = build_model("mamba-mini", **overrides)
    save_lm(model, path)
    return model


def mini_hf_dir(path, drop: str | None = None):
    """mamba-mini in the state-spaces/mamba-*-hf layout (transformers' config.json + model.safetensors)."""
    path.mkdir()
    state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v.clone()
             for k, v in build_model("mamba-mini").state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"))
    config = {"model_type": "mamba", "hidden_size": 48, "num_hidden_layers": 4, "vocab_size": 1024, "state_size": 8,
              "expand": 2, "conv_kernel": 4, "time_step_rank": 3, "tie_word_embeddings": True}
    config.pop(drop, None)
    (path / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------
# Vim .pth files
# ------------------------------------------------------------------------------------------------
def write_tensor(path):
    torch.save(torch.zeros(3), path)


def write_list(path):
    torch.save([torch.zeros(3)], path)


def write_empty(path):
    path.write_bytes(b"")


def write_text(path):
    path.write_text("<html>404 Not Found</html>\n")


def write_truncated(path):
    torch.save({"model": mini_vim_state()}, path)
    path.write_bytes(path.read_bytes()[:2000])


def write_pickled_module(path):
    torch.save(build_model("vim-mini", num_classes=3), path)


@pytest.mark.parametrize("write, needles", [
    (write_tensor, ["holds a Tensor, not a dict of tensors"]),
    (write_list, ["holds a list, not a dict of tensors"]),
    (write_empty, ["is empty (0 bytes)", "download it again"]),
    (write_text, ["not a file written by torch.save"]),
    (write_truncated, ["unreadable or truncated", "download it again"]),
    (write_pickled_module, ["holds a mambapeft.models.vim.VisionMamba object", "state dict alone"]),
])
def test_unreadable_vim_checkpoint(tmp_path, capsys, write, needles):
    path = tmp_path / "vim_mini.pth"
    write(path)
    prepare_refused(capsys, tmp_path, "vim-mini", path, str(path), *needles)


def test_vim_training_dict_loads_its_model_entry(tmp_path, capsys):
    """hustvl/Vim's training checkpoints pickle an argparse.Namespace beside the weights."""
    state = mini_vim_state()
    torch.save({"model": state, "model_ema": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "epoch": 299, "args": argparse.Namespace(model="vim_mini", lr=1e-3, finetune="")},
               tmp_path / "checkpoint.pth")
    assert prepared(capsys, tmp_path, "vim-mini", tmp_path / "checkpoint.pth")["source"] == "official"


def test_vim_checkpoint_of_another_variant(tmp_path, capsys):
    save_vim(build_model("vim-mini", num_classes=1000), tmp_path / "vim.pth")
    prepare_refused(capsys, tmp_path, "vim-t", tmp_path / "vim.pth",
                    "embed_dim=48, depth=4", "vim-t has embed_dim=192, depth=24", "backbones.vim-t.path")


def test_vim_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    prepare_refused(capsys, tmp_path, "vim-s", tmp_path / "weights",
                    "is a directory", "vim_s_midclstok_80p5acc.pth", "backbones.vim-s.path")


# ------------------------------------------------------------------------------------------------
# Mamba LM directories
# ------------------------------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path, capsys):
    mini_hf_dir(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm", str(weights), "unreadable or truncated")


@pytest.mark.parametrize("config_text, needles", [
    ('{"d_model": 48, "n_layer": 4,,}', ["config.json is not valid JSON", "line 1 column 30"]),
    ("[48, 4]", ["config.json holds a JSON list"]),
    ('{"d_model": 48, "vocab_size": 1024}', ["config.json: 'n_layer' is missing"]),
    ('{"d_model": "48", "n_layer": 4, "vocab_size": 1024}', ["config.json: 'd_model' is '48', not a positive integer"]),
    ('{"d_model": 48, "n_layer": 4, "vocab_size": 1024, "ssm_cfg": {"layer": "Mamba3"}}', ["Mamba3", "Mamba1, Mamba2"]),
])
def test_broken_config_json(tmp_path, capsys, config_text, needles):
    mini_lm_dir(tmp_path / "lm")
    (tmp_path / "lm" / "config.json").write_text(config_text)
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm", *needles)


@pytest.mark.parametrize("drop, needle", [
    ("hidden_size", "has neither 'd_model' (state-spaces/mamba-* layout) nor 'hidden_size'"),
    ("num_hidden_layers", "'num_hidden_layers' is missing"),
])
def test_hf_config_without_a_size(tmp_path, capsys, drop, needle):
    mini_hf_dir(tmp_path / "lm", drop=drop)
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm", str(tmp_path / "lm" / "config.json"), needle)


def test_empty_weights_file(tmp_path, capsys):
    mini_lm_dir(tmp_path / "lm")
    (tmp_path / "lm" / "pytorch_model.bin").write_bytes(b"")
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm", "pytorch_model.bin is empty")


def test_lm_directory_of_another_variant(tmp_path, capsys):
    """The check reads config.json before the weights, so the 130m download needs no real tensors here."""
    official = tmp_path / "mamba-130m"
    official.mkdir()
    (official / "config.json").write_text(json.dumps(MAMBA_130M_CONFIG))
    (official / "pytorch_model.bin").write_bytes(b"not read")
    prepare_refused(capsys, tmp_path, "mamba-370m", official, "d_model=768, n_layer=24",
                    "mamba-370m has d_model=1024, n_layer=48")
    mini_lm_dir(tmp_path / "tiny")
    prepare_refused(capsys, tmp_path, "mamba-130m", tmp_path / "tiny", "d_model=48, n_layer=4, padded_vocab_size=1024",
                    "mamba-130m has d_model=768, n_layer=24, padded_vocab_size=50280")


def test_untied_lm_head_is_loaded(tmp_path, capsys):
    saved = mini_lm_dir(tmp_path / "lm", tie_embeddings=False)
    assert prepared(capsys, tmp_path, "mamba-mini", tmp_path / "lm")["source"] == "official"
    assert torch.equal(build_lm_from_dir(tmp_path / "lm").lm_head.weight, saved.lm_head.weight)


def test_tied_config_with_a_different_head_is_refused(tmp_path, capsys):
    mini_lm_dir(tmp_path / "lm", tie_embeddings=False)
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "tie_embeddings": True}))
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm", "lm_head.weight differs from the embedding")


def test_lm_path_that_is_a_file(tmp_path, capsys):
    mini_lm_dir(tmp_path / "lm")
    prepare_refused(capsys, tmp_path, "mamba-mini", tmp_path / "lm" / "pytorch_model.bin",
                    "is a file", "directory that holds config.json", "backbones.mamba-mini.path")


def test_hand_written_spec_for_an_unknown_backbone(tmp_path, capsys):
    prepare_refused(capsys, tmp_path, "mamba-13b", tmp_path, "Unknown backbone 'mamba-13b'")


# ------------------------------------------------------------------------------------------------
# Language data roots
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def language_root(tmp_path):
    root = tmp_path / "data"
    mini_text.write_mini_commonsense(root, seed=0, n_train=20, n_test=5)
    mini_text.write_mini_math(root, seed=0, n_train=20, n_test=5)
    return root


@pytest.mark.parametrize("kind, train_file", [("commonsense", "commonsense_170k.json"), ("math", "math_10k.json")])
def test_training_record_without_output(language_root, capsys, kind, train_file):
    path = language_root / train_file
    records = json.loads(path.read_text())
    del records[3]["output"]
    path.write_text(json.dumps(records))
    refused(capsys, ["data", "check", "--kind", kind, str(language_root)], f"{path}: record 3 has no 'output' field")
    with pytest.raises(DataError, match="record 3 has no 'output'"):  # the reader training uses
        read_instruct_json(path)


@pytest.mark.parametrize("kind, train_file", [("commonsense", "commonsense_170k.json"), ("math", "math_10k.json")])
def test_data_check_given_the_training_file(language_root, capsys, kind, train_file):
    assert main(["data", "check", "--kind", kind, str(language_root)]) == 0
    from_directory = json.loads(capsys.readouterr().out)
    assert main(["data", "check", "--kind", kind, str(language_root / train_file)]) == 0
    assert json.loads(capsys.readouterr().out) == from_directory
    other = language_root / "eval" / "mini_arc" / "test.jsonl"
    refused(capsys, ["data", "check", "--kind", kind, str(other)],
            f"{other} is a file", f"give the {kind} data directory that holds {train_file}")
