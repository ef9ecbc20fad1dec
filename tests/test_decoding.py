"""The static-buffer greedy decoder (the one `bench generate` captures as a CUDA graph) gives the
tokens of a plain loop that re-runs the parallel forward and takes the argmax, for the bare model
and with adapters active in the scan (affix, additional-scan) and in the input (periodic tokens
re-inserted during decoding). tests/test_gpu.py checks the captured graph against it."""
import pytest
import torch

from mambapeft.models import build_model
from mambapeft.models.decoding import GreedyDecoder
from mambapeft.peft import apply_peft
from mambapeft.runspec import method_definition

PROMPT, NEW = 30, 20  # positions 30..49: periodic (period 40) re-inserts its tokens while decoding


def adapted_model(backbone: str, method: str):
    torch.manual_seed(0)
    model = build_model(backbone, vocab_size=64)
    result = apply_peft(model, method_definition("language", method, backbone, None)["peft"], method)
    with torch.no_grad():
        for p in result.trainable.values():  # non-zero adapters: one the decoder skipped would change the tokens
            p.add_(0.1 * torch.randn_like(p))
        # weights of a trained model's scale: at init's a greedy continuation repeats one token
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.normal_(std=2 * module.weight.shape[1] ** -0.5)
        model.backbone.embedding.weight.normal_()
    return model.eval()


@torch.no_grad()
def argmax_loop(model, ids, new):
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, -new:]


@pytest.mark.parametrize("backbone,method", [("mamba-mini", "zero_shot"), ("mamba-mini", "affix"),
                                             ("mamba-mini", "additional_scan"), ("mamba-mini", "periodic"),
                                             ("mamba2-mini", "periodic")])
def test_greedy_decoder_equals_a_full_forward_argmax_loop(backbone, method):
    model = adapted_model(backbone, method)
    ids = torch.randint(0, 64, (3, PROMPT))
    decoder = GreedyDecoder(model, 3, "cpu")
    expected = argmax_loop(model, ids, NEW)
    assert torch.equal(decoder.generate(ids, NEW), expected)
    assert torch.equal(decoder.generate(ids, NEW), expected), "a second call must start from the prompt again"
    assert all(s.conv is conv and s.ssm is ssm for s, (conv, ssm) in zip(decoder.states, decoder._buffers))


def test_decoder_refuses_another_batch_size():
    model = build_model("mamba-mini", vocab_size=64).eval()
    with pytest.raises(ValueError, match="built for batch 2, got 3 rows"):
        GreedyDecoder(model, 2, "cpu").generate(torch.zeros(3, 4, dtype=torch.long), 2)
