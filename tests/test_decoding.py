"""The static-buffer greedy decoder (the one `bench generate` captures as a CUDA graph) gives the
tokens of a plain loop that re-runs the parallel forward and takes the argmax, for the bare model
and with adapters active in the scan (affix, additional-scan) and in the input (periodic tokens
re-inserted during decoding), one token or several per call. tests/test_gpu.py and
tests/test_gpu_step.py check the captured graphs against it."""
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


@pytest.mark.parametrize("method", ["zero_shot", "affix", "additional_scan", "periodic", "prefix", "lora_in_proj"])
@pytest.mark.parametrize("steps_per_call", [1, 3, 8])
def test_several_steps_per_call_give_the_tokens_of_model_generate(method, steps_per_call):
    """The multi-step call (one CUDA graph replay on GPU) and the one-step calls for the remainder and
    around periodic insertions (at position 40: inside a 3- or 8-step window here) together decode
    what ``model.generate`` does."""
    model = adapted_model("mamba-mini", method)
    ids = torch.randint(0, 64, (2, PROMPT))
    decoder = GreedyDecoder(model, 2, "cpu", steps_per_call=steps_per_call)
    assert torch.equal(decoder.generate(ids, NEW), model.generate(ids, NEW))
    assert torch.equal(decoder.generate(ids, 2), model.generate(ids, 2))


def test_decoder_refuses_another_batch_size():
    model = build_model("mamba-mini", vocab_size=64).eval()
    with pytest.raises(ValueError, match="built for batch 2, got 3 rows"):
        GreedyDecoder(model, 2, "cpu").generate(torch.zeros(3, 4, dtype=torch.long), 2)


@pytest.mark.parametrize("method", ["zero_shot", "affix", "additional_scan", "periodic", "prefix"])
def test_states_stored_in_bf16_decode_and_stay_bf16(method):
    """bf16 state storage (what bench generate uses on CUDA, as mamba_ssm): every method's step runs
    with it, the states keep their dtype, and the tokens are the fp32 states' up to bf16 rounding."""
    model = adapted_model("mamba-mini", method)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    fp32 = GreedyDecoder(model, 3, "cpu", steps_per_call=4).generate(ids, 9)
    decoder = GreedyDecoder(model, 3, "cpu", steps_per_call=4, state_dtype=torch.bfloat16)
    bf16 = decoder.generate(ids, 9)
    assert all(s.conv.dtype == s.ssm.dtype == torch.bfloat16 for s in decoder.states)
    assert (bf16 == fp32).float().mean() >= 0.75


@pytest.mark.parametrize("enabled_before", [True, False])
def test_captures_run_with_the_garbage_collector_collected_then_paused(enabled_before):
    """What every CUDA-graph capture runs under (models/cuda_graphs.py): garbage in cycles is freed
    before the capture, none during it, and the collector's state is restored after, also on error."""
    import gc

    from mambapeft.models.cuda_graphs import garbage_collection_paused

    freed = []

    class Cyclic:
        def __init__(self):
            self.me = self

        def __del__(self):
            freed.append(1)

    (gc.enable if enabled_before else gc.disable)()
    try:
        Cyclic()
        with pytest.raises(ValueError), garbage_collection_paused():
            assert freed == [1] and not gc.isenabled()
            Cyclic()
            assert freed == [1]
            raise ValueError
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()
