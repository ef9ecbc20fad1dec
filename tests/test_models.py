"""Backbones: exact parameter counts, official checkpoint layouts, recurrent step mode."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from mambapeft.models import build_model
from mambapeft.models.checkpoints import CheckpointError, build_lm_from_dir, load_lm, load_vim, save_lm
from mambapeft.models.lm import LM_VARIANTS, MambaLMHeadModel
from mambapeft.models.vim import VIM_VARIANTS


def count(model, skip=()):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


@pytest.mark.parametrize("name", ["vim-t", "vim-s", "vim-b"])
def test_vim_backbone_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    assert count(model, skip=("head.",)) == VIM_VARIANTS[name].backbone_params


@pytest.mark.parametrize("name", ["mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b"])
def test_lm_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(name)
    assert model.config.padded_vocab_size == 50280  # 50277 padded to a multiple of 8
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied
    assert count(model) == LM_VARIANTS[name].params


def test_vim_middle_class_token_and_shapes():
    model = build_model("vim-t", num_classes=7, img_size=64).eval()
    seen = []
    model.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0].shape) and None)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert seen == [(2, 17, 192)]  # 16 patches + the class token
    images = torch.randn(1, 3, 64, 64)
    features = model.forward_features(images)
    assert features.shape == (1, 192)
    with torch.no_grad():  # the read-out is the token at index 8 = 16 // 2, where the class token sits
        model.cls_token.add_(1.0)
    assert not torch.allclose(model.forward_features(images), features)


def test_vim_reads_out_the_class_token_as_norming_every_token_would():
    """The last residual add, DropPath and norm_f on the class token alone (what the GPU runs) against
    all tokens then the class token's row (Vim's code), in training at the mini pipeline's pretraining
    shape, DropPath drawing its per-image mask from the same generator state: the features and every
    gradient bit for bit, but norm_f's weight's, now summed over the images instead of every token (the
    other tokens' terms are zeros): the same up to fp32 rounding."""
    torch.manual_seed(0)
    model = build_model("vim-mini", num_classes=7).train()
    images = torch.randn(64, 3, 32, 32)

    def every_token(images):  # Vim's read-out: the whole sequence normalised, then the class token
        x = model.patch_embed(images)
        cls_index = x.shape[1] // 2
        x = torch.cat([x[:, :cls_index], model.cls_token.expand(x.shape[0], -1, -1), x[:, cls_index:]], dim=1)
        hidden, residual = x + model.pos_embed, None
        for layer in model.layers:
            hidden, residual = layer(hidden, residual)
        return model.norm_f(residual + model.drop_path(hidden))[:, cls_index]

    runs = []
    for features in (model.forward_features, every_token):
        torch.manual_seed(1)
        out = features(images)
        model.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append((out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (reference, reference_grads) = runs
    assert torch.equal(out, reference) and model.drop_path.p > 0
    assert grads.keys() == reference_grads.keys() and "norm_f.weight" in grads and "cls_token" in grads
    for name, grad in grads.items():
        if name == "norm_f.weight":
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(grad, reference_grads[name]), name


@pytest.mark.parametrize("patch,size,channels", [(16, 224, 3), (8, 32, 3), (4, 12, 5)])
def test_patch_projection_is_the_patch_conv(patch, size, channels):
    """The GEMM over cut-out patches (the GPU's path) against the conv it stands for: outputs and the
    weight's, bias's and images' gradients, fp32."""
    from mambapeft.models.vim import PatchEmbed, patch_projection

    torch.manual_seed(0)
    embed = PatchEmbed(patch, channels, 24)
    images = torch.randn(2, channels, size, size, requires_grad=True)
    runs = []
    for project in (embed, lambda x: patch_projection(x, embed.proj.weight, embed.proj.bias)):
        out = project(images)
        out.backward(torch.ones_like(out) + out.detach())
        runs.append([out.detach()] + [t.grad.clone() for t in (images, embed.proj.weight, embed.proj.bias)])
        for t in (images, embed.proj.weight, embed.proj.bias):
            t.grad = None
    for got, expected in zip(*runs):
        assert got.shape == expected.shape and (got - expected).norm() <= 1e-6 * expected.norm()


def test_patch_projection_only_where_the_conv_is_a_plain_patch_cut():
    from mambapeft.models.vim import PatchEmbed, cuts_patches

    embed, images = PatchEmbed(8, 3, 16), torch.randn(1, 3, 32, 32)
    assert cuts_patches(embed.proj, images)
    assert not cuts_patches(embed.proj, torch.randn(1, 3, 36, 32))  # a remainder the conv drops
    overlapping = nn.Conv2d(3, 16, kernel_size=8, stride=4)
    padded = nn.Conv2d(3, 16, kernel_size=8, stride=8, padding=1)
    assert not cuts_patches(overlapping, images) and not cuts_patches(padded, images)
    calls = []
    embed.proj.register_forward_hook(lambda *args: calls.append(1))
    assert not cuts_patches(embed.proj, images)  # a hook's module is called, never read around
    embed(images)
    assert calls == [1]


def test_vim_head_is_zero_initialised():
    model = build_model("vim-mini", num_classes=5)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0


def test_vim_official_layout_round_trip(tmp_path):
    source = build_model("vim-mini", num_classes=1000).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DDP prefix, as some releases
    torch.save({"model": state}, tmp_path / "vim.pth")
    target = build_model("vim-mini", num_classes=10).eval()
    load_vim(target, tmp_path / "vim.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.forward_features(x), target.forward_features(x))  # ImageNet head dropped
    assert target.head.weight.shape == (10, 48)


def test_vim_checkpoint_errors_name_the_tensor(tmp_path):
    model = build_model("vim-mini", num_classes=3)
    state = model.state_dict()
    del state["layers.1.mixer.A_b_log"]
    state["pos_embed"] = torch.zeros(1, 5, 48)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mixer\.A_b_log.*pos_embed"):
        load_vim(build_model("vim-mini", num_classes=3), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vim(model, tmp_path / "missing.pth")


def tiny_lm_config():
    return {"d_model": 32, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"d_state": 4}}


def test_lm_mamba_ssm_layout_round_trip(tmp_path):
    model = MambaLMHeadModel(type(build_model("mamba-mini").config)(**tiny_lm_config())).eval()
    save_lm(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 32
    names = set(torch.load(tmp_path / "pytorch_model.bin"))
    assert "backbone.embedding.weight" in names and "backbone.layers.1.mixer.A_log" in names
    loaded = build_lm_from_dir(tmp_path).eval()
    ids = torch.randint(0, 100, (2, 9))
    assert torch.equal(model(ids), loaded(ids))


def test_lm_transformers_layout(tmp_path):
    """state-spaces/mamba-*-hf: transformers' names (backbone.embeddings) in model.safetensors."""
    model = MambaLMHeadModel(type(build_model("mamba-mini").config)(**tiny_lm_config())).eval()
    tensors = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v.clone()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 104, "state_size": 4, "expand": 2,
        "conv_kernel": 4, "time_step_rank": 2, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": True}))
    loaded = build_lm_from_dir(tmp_path).eval()
    ids = torch.randint(0, 100, (1, 7))
    assert torch.equal(model(ids), loaded(ids))


def test_lm_checkpoint_mismatch_is_named(tmp_path):
    config = type(build_model("mamba-mini").config)(**tiny_lm_config())
    save_lm(MambaLMHeadModel(config), tmp_path)
    bigger = MambaLMHeadModel(type(config)(**{**tiny_lm_config(), "d_model": 48}))
    with pytest.raises(CheckpointError, match="in_proj.weight"):
        load_lm(bigger, tmp_path)


# Mamba-2: the prefill of 19 tokens ends inside the mini model's second chunk (chunk_size 16)
LM_STEP_CASES = [("mamba-mini", 20, 8), ("mamba2-mini", 40, 19)]


@pytest.mark.parametrize("variant, length, prefill_length", LM_STEP_CASES)
def test_lm_step_mode_equals_parallel_forward(variant, length, prefill_length):
    model = build_model(variant, vocab_size=64).eval()
    ids = torch.randint(0, 64, (3, length))
    with torch.no_grad():
        full = model(ids)
        states = model.empty_states(3)
        prefill = model(ids[:, :prefill_length], states)
        stepped = [model._step_token(ids[:, t], t, states) for t in range(prefill_length, length)]
    assert torch.allclose(prefill, full[:, :prefill_length], atol=1e-6)
    assert torch.allclose(torch.stack(stepped, 1), full[:, prefill_length:], atol=1e-5)


@pytest.mark.parametrize("variant", [variant for variant, _, _ in LM_STEP_CASES])
def test_greedy_generation_matches_argmax_of_parallel_forward(variant):
    model = build_model(variant, vocab_size=64).eval()
    prompt = torch.randint(1, 64, (2, 6))
    generated = model.generate(prompt, max_new_tokens=5)
    sequence = prompt
    for _ in range(5):  # the same tokens, recomputed from scratch with the parallel forward
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, sequence[:, 6:])


def test_frozen_state_matrix_is_computed_once_until_A_log_changes(monkeypatch):
    from torch.nn.utils import parametrize
    from mambapeft.models.mamba import FORWARD, Mamba

    real_exp = torch.exp

    def _state_matrix_kernels(mixer, direction) -> int:
        """How many times A = -exp(A_log) is computed by one call of the mixer's _state_matrix."""
        calls = []
        monkeypatch.setattr(torch, "exp", lambda *a, **k: calls.append(1) or real_exp(*a, **k))
        mixer._state_matrix(direction)
        monkeypatch.setattr(torch, "exp", real_exp)
        return len(calls)

    mixer = Mamba(16, d_state=4)
    mixer.A_log.requires_grad_(False)  # frozen, as under PEFT
    first = mixer._state_matrix(FORWARD)
    assert torch.equal(first, -torch.exp(mixer.A_log))
    assert _state_matrix_kernels(mixer, FORWARD) == 0  # kept
    with torch.no_grad():
        mixer.A_log.add_(0.5)  # an in-place write (a load, an optimizer step) bumps the version
    assert _state_matrix_kernels(mixer, FORWARD) == 1
    assert torch.equal(mixer._state_matrix(FORWARD), -torch.exp(mixer.A_log))
    mixer.A_log.requires_grad_(True)  # trained: computed on each call, the gradient flows
    assert _state_matrix_kernels(mixer, FORWARD) == 1
    mixer._state_matrix(FORWARD).sum().backward()
    assert torch.equal(mixer.A_log.grad, -torch.exp(mixer.A_log.detach()))
    with torch.inference_mode():  # not kept: an inference tensor cannot be saved for a later backward
        mixer.A_log.requires_grad_(False)
        assert _state_matrix_kernels(mixer, FORWARD) == 1
    parametrize.register_parametrization(mixer, "A_log", _Shift())  # read through the parametrisation
    assert _state_matrix_kernels(mixer, FORWARD) == 1
    assert torch.equal(mixer._state_matrix(FORWARD), -torch.exp(mixer.A_log))


def test_a_graph_reads_the_kept_state_matrix_refreshed_before_each_replay(monkeypatch):
    """While a capture records its reads (cuda_graphs.graph_reads_recorded), a frozen A_log's kept A is
    handed to the graph, not computed in it; each replay first writes it again in place where A_log was
    written since (a load after the capture), and only then. A capture not recording computes it."""
    from mambapeft.models import cuda_graphs
    from mambapeft.models.mamba import FORWARD, Mamba

    real_exp, calls = torch.exp, []
    monkeypatch.setattr(torch, "exp", lambda *a, **k: calls.append(1) or real_exp(*a, **k))
    mixer = Mamba(16, d_state=4)
    mixer.A_log.requires_grad_(False)
    kept = mixer._state_matrix(FORWARD)  # before the capture (its warm-up runs)
    monkeypatch.setattr(cuda_graphs, "is_capturing", lambda t: True)
    calls.clear()
    with cuda_graphs.graph_reads_recorded() as reads:
        assert mixer._state_matrix(FORWARD) is kept and not calls
    assert len(reads) == 1
    assert mixer._state_matrix(FORWARD) is not kept and len(calls) == 1  # not recording: in the graph
    monkeypatch.setattr(cuda_graphs, "is_capturing", lambda t: False)
    replay = cuda_graphs.refreshed(reads, lambda: kept.clone())  # what the graph reads at a replay
    calls.clear()
    assert torch.equal(replay(), -real_exp(mixer.A_log)) and not calls
    with torch.no_grad():
        mixer.A_log.add_(0.5)
    assert torch.equal(replay(), -real_exp(mixer.A_log)) and len(calls) == 1
    assert torch.equal(kept, -real_exp(mixer.A_log))  # in place: the tensor the graph reads
    calls.clear()
    replay()
    assert not calls


class _Shift(nn.Module):
    def forward(self, x):
        return x + 1.0
