"""Mamba-2 as a backbone: the PyTorch SSD equals a naive float64 recurrence, the model equals
transformers' Mamba2ForCausalLM, both checkpoint layouts load, step mode equals the parallel
forward, configs are checked, and the PEFT methods whose modules exist in Mamba-2 run on it."""
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from mambapeft import runtime
from mambapeft.cli import main as cli
from mambapeft.models import build_model
from mambapeft.models.checkpoints import CheckpointError, build_lm_from_dir, save_lm
from mambapeft.models.lm import LM_VARIANTS, MambaLMConfig
from mambapeft.models.mamba2 import Mamba2
from mambapeft.models.scan import TORCH_BACKEND, chunk_scan_step, chunk_scan_torch
from mambapeft.peft import PeftConfigError, apply_peft, check_gradients, zero_initialised
from mambapeft.peft.lora import row_blocks
from mambapeft.runspec import method_definition


def rel_err(ours, ref):
    ours, ref = ours.detach(), ref.detach()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# the scan
# ------------------------------------------------------------------------------------------------
def naive_ssd(x, dt, A, B, C, D, dt_bias, dt_limit):
    """One step at a time, the SSD recurrence of the Mamba-2 paper (float64): per head h, with the
    group g = h // (H/G) of B and C, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    heads, groups = x.shape[2], B.shape[2]
    dt = F.softplus(dt + dt_bias).clamp(*dt_limit)
    B, C = (t.repeat_interleave(heads // groups, dim=2) for t in (B, C))  # (b, L, H, N)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[3])
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


def ssd_inputs(b, length, heads, headdim, groups, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(b * 1000 + length * 10 + heads + groups)
    shapes = [(b, length, heads, headdim), (b, length, heads), (heads,), (b, length, groups, n),
              (b, length, groups, n), (heads,), (heads,)]
    x, dt, A, B, C, D, dt_bias = (torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    return x, dt, -torch.exp(A), B, C, D, dt_bias


@pytest.mark.parametrize("b,length,heads,headdim,groups,n,chunk,dt_limit", [
    (2, 1, 2, 3, 1, 4, 8, (0.0, float("inf"))),  # one step
    (2, 5, 4, 2, 2, 3, 8, (0.0, float("inf"))),  # shorter than a chunk
    (1, 32, 4, 3, 1, 5, 8, (0.0, float("inf"))),  # whole chunks
    (2, 37, 6, 2, 3, 4, 8, (0.0, float("inf"))),  # a partial last chunk, three groups
    (2, 20, 4, 2, 4, 4, 6, (0.05, 0.5)),  # a group per head, dt clamped
])
def test_chunk_scan_matches_sequential_float64_loop(b, length, heads, headdim, groups, n, chunk, dt_limit):
    args = ssd_inputs(b, length, heads, headdim, groups, n)
    ref_in = [t.clone().requires_grad_() for t in args]
    our_in = [t.clone().requires_grad_() for t in args]
    y_ref, last_ref = naive_ssd(*ref_in, dt_limit)
    x, dt, A, B, C, D, dt_bias = our_in
    y, last = chunk_scan_torch(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
                               return_final_states=True)
    weights, state_weights = torch.randn_like(y_ref), torch.randn_like(last_ref)
    ((y_ref * weights).sum() + (last_ref * state_weights).sum()).backward()
    ((y * weights).sum() + (last * state_weights).sum()).backward()
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(last, last_ref) < 1e-10
    for name, ours, ref in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), our_in, ref_in):
        assert rel_err(ours.grad, ref.grad) < 1e-10, name


def test_step_continues_the_chunked_scan():
    x, dt, A, B, C, D, dt_bias = ssd_inputs(2, 30, 4, 3, 2, 5)
    full = chunk_scan_torch(x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True)
    _, state = chunk_scan_torch(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], 8, D=D, dt_bias=dt_bias,
                                dt_softplus=True, return_final_states=True)
    stepped = [chunk_scan_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, dt_bias, dt_softplus=True)
               for t in range(19, 30)]
    assert rel_err(torch.stack(stepped, 1), full[:, 19:]) < 1e-12


def test_chunk_scan_computes_in_fp32_under_autocast():
    args = ssd_inputs(2, 20, 4, 3, 1, 4, torch.float32)
    plain = chunk_scan_torch(*args[:5], 8, D=args[5], dt_bias=args[6], dt_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = chunk_scan_torch(*args[:5], 8, D=args[5], dt_bias=args[6], dt_softplus=True)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


# ------------------------------------------------------------------------------------------------
# the model, its variants and its checkpoints
# ------------------------------------------------------------------------------------------------
MAMBA2_VARIANTS = sorted(n for n in LM_VARIANTS if n.startswith("mamba2-") and LM_VARIANTS[n].params)


@pytest.mark.parametrize("name", MAMBA2_VARIANTS)
def test_mamba2_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(name)
    assert model.config.padded_vocab_size == 50288  # 50277 padded to a multiple of 16
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert all(isinstance(layer.mixer, Mamba2) for layer in model.backbone.layers)
    assert sum(p.numel() for p in model.parameters()) == LM_VARIANTS[name].params


def test_params_command_counts_the_published_mamba2_130m(capsys):
    assert cli(["params", "--backbone", "mamba2-130m", "--method", "full"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 128_989_632


def test_mixer_follows_mamba_ssm_defaults():
    mixer = build_model("mamba2-130m", n_layer=1).backbone.layers[0].mixer
    assert (mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups, mixer.chunk_size) == (24, 64, 128, 1, 256)
    assert mixer.in_proj.weight.shape == (2 * 1536 + 2 * 128 + 24, 768)  # [z | x | B | C | dt]
    assert mixer.conv1d.weight.shape == (1536 + 2 * 128, 1, 4) and mixer.norm.weight.shape == (1536,)
    A = torch.exp(mixer.A_log)
    dt = F.softplus(mixer.dt_bias)
    assert bool((A >= 1).all() and (A <= 16).all() and (dt >= 1e-4).all() and (dt <= 0.1).all())
    assert not mixer.uses_fused_inner()


def test_row_blocks_are_the_mixers_own_split_of_in_proj():
    mixer = Mamba2(32, d_state=4, headdim=8, ngroups=2)
    rows = torch.arange(mixer.in_proj.out_features)
    z, xBC, dt = mixer._split(rows)
    x, B, C = mixer._heads(xBC)
    split = {"z": z, "x": x.flatten(), "B": B.flatten(), "C": C.flatten(), "dt": dt}
    blocks = row_blocks(mixer, "in_proj")
    assert list(blocks) == ["z", "x", "B", "C", "dt"]
    for part, (start, stop) in blocks.items():
        assert torch.equal(split[part], torch.arange(start, stop)), part


@pytest.mark.parametrize("ngroups,tied", [(1, True), (2, False)])
def test_transformers_mamba2_checkpoint_gives_the_same_logits(tmp_path, ngroups, tied):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
    if torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm"):
        pytest.skip("transformers <5.24 sends its Mamba-2 to mamba-ssm's CUDA kernels whenever they are installed, "
                    "even for CPU tensors; this CPU comparison runs where they are not (CI)")
    config = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8,
                                       n_groups=ngroups, expand=2, conv_kernel=4, chunk_size=8, vocab_size=96,
                                       tie_word_embeddings=tied, use_cache=False)
    reference = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial values everywhere, and steps large enough for the scan to matter
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in reference.backbone.layers:
            layer.mixer.dt_bias.normal_()
    reference.save_pretrained(tmp_path)  # config.json + model.safetensors with transformers' names
    ours = build_lm_from_dir(tmp_path).eval()
    assert (ours.lm_head.weight is ours.backbone.embedding.weight) == tied
    ids = torch.randint(0, 96, (2, 23))  # three chunks, the last partial
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours(ids)[..., : expected.shape[-1]]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_mamba_ssm_layout_round_trip(tmp_path):
    model = build_model("mamba2-mini", vocab_size=64).eval()
    save_lm(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ssm_cfg"]["layer"] == "Mamba2"
    names = set(torch.load(tmp_path / "pytorch_model.bin"))
    assert {"backbone.layers.3.mixer.dt_bias", "backbone.layers.0.mixer.norm.weight"} <= names  # mamba_ssm's names
    loaded = build_lm_from_dir(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 21))
    assert torch.equal(model(ids), loaded(ids))


def test_a_missing_mixer_tensor_is_named(tmp_path):
    save_lm(build_model("mamba2-mini", vocab_size=64), tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin")
    del state["backbone.layers.1.mixer.dt_bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing \['backbone\.layers\.1\.mixer\.dt_bias'\]"):
        build_lm_from_dir(tmp_path)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def test_an_unknown_mixer_layer_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"ssm_cfg\.layer 'Mamba3' is not a known mixer; valid layers: Mamba1, Mamba2"):
        MambaLMConfig(ssm_cfg={"layer": "Mamba3"})
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": 100,
                                                      "ssm_cfg": {"layer": "Mamba3"}}))
    with pytest.raises(CheckpointError, match=r"config\.json: ssm_cfg\.layer 'Mamba3' .* Mamba1, Mamba2"):
        build_lm_from_dir(tmp_path)


@pytest.mark.parametrize("ssm_cfg,key", [({"layer": "Mamba2", "use_mem_eff_path": False}, "use_mem_eff_path"),
                                         ({"layer": "Mamba2", "dt_rank": 4}, "dt_rank"),  # a Mamba-1 setting
                                         ({"headdim": 16}, "headdim")])  # a Mamba-2 setting on Mamba-1
def test_an_unknown_ssm_cfg_key_is_named(ssm_cfg, key):
    with pytest.raises(ValueError, match=rf"ssm_cfg keys \['{key}'\] are not .* settings; valid keys: layer, "):
        MambaLMConfig(ssm_cfg=ssm_cfg)


def test_sizes_the_mixer_refuses_are_one_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 48, "n_layer": 2, "vocab_size": 100,
                                                      "ssm_cfg": {"layer": "Mamba2"}}))  # 96 channels, headdim 64
    with pytest.raises(CheckpointError, match=r"config\.json: Mamba2: .* not a multiple of headdim 64; set ssm_cfg"):
        build_lm_from_dir(tmp_path)


CONFIG_CHECK = """
import json, sys, torch
from mambapeft.models.checkpoints import read_lm_config
torch.manual_seed(0)
state = torch.get_rng_state()
read_lm_config(sys.argv[1])
print(json.dumps([torch.equal(state, torch.get_rng_state()), "torch._dynamo" in sys.modules]))
"""


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_reading_a_config_leaves_the_random_generator_and_imports_no_dynamo(tmp_path, layer):
    """The config check builds one mixer (its sizes refused there: above) on the CPU without drawing from the
    caller's generator (a run's seed then means the same draws), and not on the meta device, whose
    elementwise ops import torch._dynamo (1.3 s in every evaluate job). In a subprocess: a fresh import."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": 100,
                                                      "ssm_cfg": {"layer": layer}}))
    run = subprocess.run([sys.executable, "-c", CONFIG_CHECK, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == [True, False]


def test_a_mamba2_checkpoint_for_a_mamba1_backbone_names_the_mixer(tmp_path):
    from mambapeft.train.backbone import check_official

    save_lm(build_model("mamba2-mini", d_model=48, n_layer=4, vocab_size=1024), tmp_path)
    with pytest.raises(CheckpointError, match="ssm_cfg.layer=Mamba2 but mamba-mini has .*ssm_cfg.layer=Mamba1"):
        check_official("mamba-mini", tmp_path)


# ------------------------------------------------------------------------------------------------
# PEFT on Mamba-2
# ------------------------------------------------------------------------------------------------
# language/methods.yaml methods whose modules Mamba-2 has
YAML_METHODS = ["zero_shot", "full", "lora_in_proj", "lorap_x", "prefix", "periodic", "ia3", "lora_ia3"]
# the rest of what the brief of issue 16 asks for, written as members
MEMBER_METHODS = {
    **{f"lorap_{part}": [{"family": "lora", "targets": ["mixer.in_proj"], "part": part, "rank": 4, "scale": 0.1}]
       for part in ("z", "B", "C", "dt")},
    "lora_out_proj": [{"family": "lora", "targets": ["mixer.out_proj"], "rank": 4, "style": "merged"}],
    "partial": [{"family": "partial", "targets": ["mixer.A_log", "mixer.D", "mixer.dt_bias", "conv1d.weight",
                                                  "conv1d.bias"]}],
    "partial_direct": [{"family": "partial", "mode": "direct", "targets": ["mixer.dt_bias"]}],
    "lorap_B_and_partial_A": [{"family": "lora", "targets": ["mixer.in_proj"], "part": "B", "rank": 4},
                              {"family": "partial", "targets": ["mixer.A_log"]}],  # row blocks of a parametrised mixer
}
CHANGES_OUTPUTS = {"prefix", "periodic"}  # inserted tokens: not an identity at initialisation


def members(method: str) -> list[dict]:
    if method in MEMBER_METHODS:
        return MEMBER_METHODS[method]
    return method_definition("language", method, "mamba2-mini", None)["peft"]


@pytest.mark.parametrize("method", YAML_METHODS + sorted(MEMBER_METHODS))
def test_method_on_mamba2_trains_is_identity_at_init_and_steps(method):
    model = build_model("mamba2-mini", vocab_size=64).eval()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        before = model(ids)
    result = apply_peft(model, members(method), method)
    with torch.no_grad():
        after = model(ids)
    if method not in CHANGES_OUTPUTS:
        assert torch.allclose(after, before, atol=1e-5), "a zero-initialised method changed the outputs"
    if result.trainable:
        model.train()
        model(ids).logsumexp(-1).mean().backward()
        check_gradients(result, zero_initialised(result))
        with torch.no_grad():  # trained-looking values, so step mode is checked on a changed model
            for p in result.trainable.values():
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        full = model(ids)
        states = model.empty_states(2)
        model(ids[:, :25], states)
        stepped = torch.stack([model._step_token(ids[:, t], t, states) for t in range(25, 40)], 1)
    assert torch.allclose(stepped, full[:, 25:], atol=1e-4)


@pytest.mark.parametrize("method,family", [("additional_scan", "additional_scan"), ("affix", "affix"),
                                           ("affix_noproj", "affix")])
def test_mamba1_families_refuse_mamba2(method, family):
    model = build_model("mamba2-mini", vocab_size=64)
    with pytest.raises(PeftConfigError, match=f"{family} is defined for Mamba-1 mixers; this model's are Mamba-2"):
        apply_peft(model, members(method), method)


def test_lorap_x_proj_parts_do_not_exist_in_mamba2():
    model = build_model("mamba2-mini", vocab_size=64)
    with pytest.raises(PeftConfigError, match=r"lora part 'dt' is not defined for .*out_proj; valid parts: \[\]"):
        apply_peft(model, [{"family": "lora", "targets": ["mixer.out_proj"], "part": "dt"}], "bad")


def test_select_backend_reaches_every_mamba2_mixer(monkeypatch):
    marked = TORCH_BACKEND.__class__("marked", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d)
    monkeypatch.setattr(runtime, "resolve_backend", lambda device, requested: marked)
    model = build_model("mamba2-mini", vocab_size=64)
    settings = {"scan_backend": "auto", "allow_torch_fallback": True}
    assert runtime.select_backend(model, torch.device("cpu"), settings) == "marked"
    assert all(layer.mixer.backend is marked for layer in model.backbone.layers)
