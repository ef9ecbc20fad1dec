"""The transformers baselines of the benchmarks: ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` with
the sizes of one of our LM configs, optionally with our model's weights (the two share the mixers'
parameter names; only the embedding is renamed, as ``models/checkpoints.filter_mamba_hf`` reads it)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.checkpoints import HF_EMBEDDING, OUR_EMBEDDING
from ..models.lm import MambaLMConfig, mixer_from_ssm_cfg


def hf_config(config: MambaLMConfig):
    """transformers' MambaConfig or Mamba2Config of the same model (padded vocabulary, tying, norms)."""
    import transformers

    mixer_class, settings = mixer_from_ssm_cfg(config.ssm_cfg)
    with torch.device("meta"):  # the mixer's resolved sizes (defaults, "auto" rank), without memory
        mixer = mixer_class(config.d_model, **settings)
    common = dict(hidden_size=config.d_model, num_hidden_layers=config.n_layer, vocab_size=config.padded_vocab_size,
                  layer_norm_epsilon=config.norm_epsilon, residual_in_fp32=config.residual_in_fp32,
                  tie_word_embeddings=config.tie_embeddings, state_size=mixer.d_state, conv_kernel=mixer.d_conv,
                  expand=mixer.expand, use_conv_bias=mixer.conv1d.bias is not None,
                  use_bias=mixer.in_proj.bias is not None, pad_token_id=0, bos_token_id=None,
                  eos_token_id=None)  # no stop token: a benchmark's greedy generation runs its full length
    if config.mixer_layer == "Mamba2":
        return transformers.Mamba2Config(**common, head_dim=mixer.headdim, num_heads=mixer.nheads,
                                         n_groups=mixer.ngroups, chunk_size=mixer.chunk_size,
                                         time_step_limit=mixer.dt_limit, norm_before_gate=mixer.norm.norm_before_gate)
    return transformers.MambaConfig(**common, time_step_rank=mixer.dt_rank)


def hf_causal_lm(config: MambaLMConfig, device: torch.device | str, dtype: torch.dtype,
                 weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """transformers' causal LM of ``config`` on ``device`` in ``dtype``; ``weights``: our model's
    state dict (loaded strictly), else transformers' random initialisation."""
    import transformers

    hf = hf_config(config)
    model_class = transformers.Mamba2ForCausalLM if config.mixer_layer == "Mamba2" else transformers.MambaForCausalLM
    with torch.device(device):  # initialised where it runs: seconds for Mamba-1.4b instead of a minute on CPU
        model = model_class(hf)
    if weights is not None:
        renamed = {(HF_EMBEDDING if k == OUR_EMBEDDING else k): v for k, v in weights.items()}
        if config.tie_embeddings:
            renamed.setdefault("lm_head.weight", renamed[HF_EMBEDDING])
        model.load_state_dict(renamed, strict=True)
    return model.to(dtype)
