"""Our Mamba LM is the same function as transformers' MambaForCausalLM (the state-spaces/mamba-*-hf
implementation): a model saved by transformers loads through our checkpoint filter and gives the
same logits. Skipped when transformers is not installed (it is in the `test` extra)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

from mambapeft.models.checkpoints import build_lm_from_dir  # noqa: E402


@pytest.mark.parametrize("hidden,layers,state,dt_rank", [(32, 2, 4, "auto"), (48, 3, 16, 6)])
def test_transformers_checkpoint_gives_the_same_logits(tmp_path, hidden, layers, state, dt_rank):
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=hidden, num_hidden_layers=layers, state_size=state, vocab_size=96,
                                      expand=2, conv_kernel=4, time_step_rank=dt_rank, use_cache=False)
    reference = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial values everywhere, not the init's zeros and ones
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    reference.save_pretrained(tmp_path)  # config.json + model.safetensors with transformers' names
    ours = build_lm_from_dir(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 23))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours(ids)[..., : expected.shape[-1]]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
