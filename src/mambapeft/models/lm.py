"""Mamba language model with mamba_ssm's ``MambaLMHeadModel`` semantics: the mixer chosen by
``ssm_cfg.layer`` (Mamba1, Mamba2), tied embedding/lm_head, vocabulary padded to a multiple of
``pad_vocab_size_multiple`` (8 in the Mamba-1 releases, 16 in the Mamba-2 ones), RMSNorm, fp32
residual stream; parameter names as mamba_ssm (``backbone.embedding``, ``backbone.layers.{i}.mixer.*``,
``backbone.norm_f``, ``lm_head``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn

from .init import init_mamba_weights
from .mamba import Block, Mamba, Mixer, MixerState, RMSNorm, add_and_norm
from .mamba2 import Mamba2

# mamba_ssm's ``ssm_layer_map``: what ``ssm_cfg.layer`` selects
MIXERS: dict[str, type[Mixer]] = {"Mamba1": Mamba, "Mamba2": Mamba2}
DEFAULT_MIXER = "Mamba1"  # a config without ``ssm_cfg.layer`` (every Mamba-1 release)


def mixer_from_ssm_cfg(ssm_cfg: dict) -> tuple[type[Mixer], dict]:
    """The mixer class ``ssm_cfg.layer`` names and its keyword arguments (the rest of ssm_cfg).
    An unknown layer or a key that mixer does not take is a ValueError naming it and the valid ones."""
    if not isinstance(ssm_cfg, dict):
        raise ValueError(f"ssm_cfg must be an object of mixer settings, got {ssm_cfg!r}")
    settings = dict(ssm_cfg)
    layer = settings.pop("layer", DEFAULT_MIXER)
    if layer not in MIXERS:
        raise ValueError(f"ssm_cfg.layer {layer!r} is not a known mixer; valid layers: {', '.join(MIXERS)}")
    mixer = MIXERS[layer]
    unknown = sorted(set(settings) - mixer.ssm_cfg_keys())
    if unknown:
        raise ValueError(f"ssm_cfg keys {unknown} are not {layer} ({mixer.label}) mixer settings; "
                         f"valid keys: layer, {', '.join(sorted(mixer.ssm_cfg_keys()))}")
    return mixer, settings


@dataclass
class MambaLMConfig:
    """mamba_ssm's ``MambaConfig`` fields (so its config.json loads as ``MambaLMConfig(**json)``)."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    d_intermediate: int = 0
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)

    def __post_init__(self):
        mixer_from_ssm_cfg(self.ssm_cfg)  # a wrong layer or key fails here, not deep inside the model

    @property
    def mixer_layer(self) -> str:
        """The ``ssm_cfg.layer`` this config builds (Mamba1 when unset)."""
        return self.ssm_cfg.get("layer", DEFAULT_MIXER)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m


@dataclass(frozen=True)
class LMVariant:
    config: dict
    params: int | None = None  # total parameters (tied head counted once)
    hub_id: str | None = None


# What every state-spaces/mamba2-* config.json sets (d_state 128, headdim 64, ngroups 1: the mixer's defaults)
MAMBA2 = dict(ssm_cfg={"layer": "Mamba2"}, pad_vocab_size_multiple=16)

LM_VARIANTS: dict[str, LMVariant] = {
    "mamba-130m": LMVariant(dict(d_model=768, n_layer=24), 129_135_360, "state-spaces/mamba-130m"),
    "mamba-370m": LMVariant(dict(d_model=1024, n_layer=48), 371_516_416, "state-spaces/mamba-370m"),
    "mamba-790m": LMVariant(dict(d_model=1536, n_layer=48), 793_204_224, "state-spaces/mamba-790m"),
    "mamba-1.4b": LMVariant(dict(d_model=2048, n_layer=48), 1_372_178_432, "state-spaces/mamba-1.4b"),
    "mamba-2.8b": LMVariant(dict(d_model=2560, n_layer=64), 2_768_345_600, "state-spaces/mamba-2.8b"),
    # The offline mini experiment: same architecture, CPU-sized; vocab from the offline tokenizer.
    "mamba-mini": LMVariant(dict(d_model=48, n_layer=4, vocab_size=1024, ssm_cfg={"d_state": 8})),
    # The length study's base models (Vlasov's mamba_research configs), pretrained here on the
    # synthetic recall tasks; vocab: data/synthetic.py's 16 symbols + COPY, PASTE, PAD
    "mamba_16": LMVariant(dict(d_model=8, n_layer=2, vocab_size=19, ssm_cfg={"d_state": 4})),
    "mamba_128": LMVariant(dict(d_model=32, n_layer=2, vocab_size=19, ssm_cfg={"d_state": 16})),
    "mamba_256": LMVariant(dict(d_model=32, n_layer=2, vocab_size=19, ssm_cfg={"d_state": 16})),
    "mamba2-130m": LMVariant(dict(d_model=768, n_layer=24, **MAMBA2), 128_989_632, "state-spaces/mamba2-130m"),
    "mamba2-370m": LMVariant(dict(d_model=1024, n_layer=48, **MAMBA2), 368_346_624, "state-spaces/mamba2-370m"),
    "mamba2-780m": LMVariant(dict(d_model=1536, n_layer=48, **MAMBA2), 780_161_280, "state-spaces/mamba2-780m"),
    "mamba2-1.3b": LMVariant(dict(d_model=2048, n_layer=48, **MAMBA2), 1_343_757_312, "state-spaces/mamba2-1.3b"),
    "mamba2-2.7b": LMVariant(dict(d_model=2560, n_layer=64, **MAMBA2), 2_702_599_680, "state-spaces/mamba2-2.7b"),
    # the dt_bias initialisation study's model (config/paper.yaml dt_init.model), for its parameter counts
    "mamba2-dt-study": LMVariant(dict(d_model=256, n_layer=12, **MAMBA2), 18_459_168),
    # CPU-sized Mamba-2 for tests: several heads, and chunks shorter than a test sequence
    "mamba2-mini": LMVariant(dict(d_model=48, n_layer=4, vocab_size=1024, pad_vocab_size_multiple=16,
                                  ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})),
}


class MixerModel(nn.Module):
    """Embedding -> blocks -> final norm.

    Extension point: ``input_tokens`` (default None) inserts learnable tokens into the embedded
    sequence (prefix / periodic tuning). It provides ``expand(hidden) -> (hidden, keep)`` for
    whole sequences, where ``keep`` indexes the real tokens, and ``tokens_before(position)`` for
    step-by-step generation.
    """

    def __init__(self, config: MambaLMConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        mixer, settings = mixer_from_ssm_cfg(config.ssm_cfg)
        self.layers = nn.ModuleList(
            Block(config.d_model, mixer(config.d_model, layer_idx=i, **settings),
                  norm_eps=config.norm_epsilon, residual_in_fp32=config.residual_in_fp32)
            for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.input_tokens: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, states: list[MixerState] | None = None) -> torch.Tensor:
        """input_ids: (B, L) -> hidden states (B, L, D) of the real tokens."""
        hidden = self.embedding(input_ids)
        keep = None
        if self.input_tokens is not None:
            hidden, keep = self.input_tokens.expand(hidden)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, state=None if states is None else states[i])
        hidden = self._final_norm(hidden, residual)
        return hidden if keep is None else hidden[:, keep]

    def step_embedded(self, hidden: torch.Tensor, states: list[MixerState]) -> torch.Tensor:
        """hidden: (B, 1, D) embedded token -> final hidden (B, 1, D); advances ``states``."""
        residual = None
        for layer, state in zip(self.layers, states):
            hidden, residual = layer.step(hidden, residual, state)
        return self._final_norm(hidden, residual)

    def _final_norm(self, hidden, residual) -> torch.Tensor:
        """norm_f of the last residual, added and normalised as in the blocks (:func:`add_and_norm`)."""
        return add_and_norm(self.norm_f, self.layers[0].mixer.backend, hidden, residual)[0]


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaLMConfig):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.apply(partial(init_mamba_weights, n_layer=config.n_layer))
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def classifier_names(self) -> tuple[str, ...]:
        return ()

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward_hidden(self, input_ids, states=None) -> torch.Tensor:
        return self.backbone(input_ids, states)

    def forward(self, input_ids: torch.Tensor, states: list[MixerState] | None = None) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, L, V_padded)."""
        return self.lm_head(self.forward_hidden(input_ids, states))

    def empty_states(self, batch: int, device=None) -> list[MixerState]:
        return [layer.mixer.empty_state(batch, device) for layer in self.backbone.layers]

    def _step_token(self, token_ids: torch.Tensor, position: int, states) -> torch.Tensor:
        """Feed one real token (B,) at absolute ``position`` (after any inserted tokens) -> logits (B, V)."""
        extra = None if self.backbone.input_tokens is None else self.backbone.input_tokens.tokens_before(position)
        if extra is not None:  # e.g. periodic tokens re-inserted every P positions
            for token in extra:  # (n, D)
                self.backbone.step_embedded(token.expand(token_ids.shape[0], 1, -1), states)
        hidden = self.backbone.step_embedded(self.backbone.embedding(token_ids).unsqueeze(1), states)
        return self.lm_head(hidden[:, 0])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """Greedy decoding with the recurrent step mode.

        input_ids: (B, L), all rows the same length (no padding enters the state).
        Returns the generated ids (B, <= max_new_tokens); rows that hit a stop id are padded with it.
        """
        batch, length = input_ids.shape
        states = self.empty_states(batch, input_ids.device)
        logits = self.forward(input_ids, states)[:, -1]
        out, done = [], torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        stops = torch.tensor(list(stop_ids), device=input_ids.device, dtype=torch.long)
        for i in range(max_new_tokens):
            token = logits.argmax(-1)
            if len(stop_ids):
                token = torch.where(done, stops[0], token)
                done |= torch.isin(token, stops)
            out.append(token)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = self._step_token(token, length + i, states)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(batch, 0)

    def describe(self) -> dict:
        return {"family": "mamba_lm", **asdict(self.config)}


def build_lm(name: str, **overrides) -> MambaLMHeadModel:
    if name not in LM_VARIANTS:
        raise KeyError(f"Unknown Mamba LM variant {name!r}; known: {', '.join(LM_VARIANTS)}")
    return MambaLMHeadModel(MambaLMConfig(**{**LM_VARIANTS[name].config, **overrides}))
