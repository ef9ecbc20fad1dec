"""The lm-evaluation-harness model ``mambapeft``: a Mamba LM backbone plus a saved adapter.

    mambapeft lm-eval --model mambapeft \\
        --model_args backbone=resources/weights/mamba-130m,adapter=results/runs/.../adapter.safetensors \\
        --device cuda \\
        --tasks piqa hellaswag --data-root resources/commonsense

lm-eval discovers no model plugins, so ``mambapeft lm-eval`` is lm-eval's own command line with
this module imported (which registers the model); from Python, import this module and pass
``model="mambapeft"`` or a :class:`MambaPeftLM` instance to ``lm_eval.simple_evaluate``. The
training jobs evaluate through the same class, wrapping the model they have just trained.

``backbone`` is a directory in either published layout (``state-spaces/mamba-*`` or ``-hf``);
``adapter`` an ``adapter.safetensors`` written by a run (it names its method, which is applied
before its tensors are loaded); ``tokenizer`` defaults to the backbone directory.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval registers its own models, hf included, only while its registry is empty: before ours)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..build import bare_spec, build_trainable
from ..data.tokenizer import TextTokenizer, load_tokenizer
from ..models.lm import MambaLMHeadModel
from ..peft.state import read_adapter_method
from ..runtime import autocast_for, resolve_device
from .loglikelihood import score_continuations

MODEL_NAME = "mambapeft"
log = logging.getLogger("mambapeft.lm_eval")


def load_lm_with_adapter(backbone: str | Path, adapter: str | Path | None = None, device: torch.device | None = None,
                         scan_backend: str = "auto") -> MambaLMHeadModel:
    """The backbone with the adapter's method applied and its tensors loaded, frozen for
    evaluation, placed on ``device`` as training places it (kept where it is when None)."""
    method = read_adapter_method(adapter) if adapter is not None else {"id": "zero_shot", "peft": []}
    spec = bare_spec("language", None, method, path=str(backbone))
    spec["runtime"]["scan_backend"] = scan_backend
    model = build_trainable(spec, device, adapter=adapter).model
    return model.requires_grad_(False).eval()


@register_model(MODEL_NAME)
class MambaPeftLM(TemplateLM):
    """lm-eval's LM interface over :class:`MambaLMHeadModel`: log-likelihoods (multiple choice,
    perplexity) and greedy generation with the recurrent step mode (every PEFT method can generate)."""

    def __init__(self, backbone: str | None = None, adapter: str | None = None, tokenizer: str | None = None,
                 device: str | None = None, batch_size: int | str = 16, max_length: int = 2048,
                 max_gen_toks: int = 256, scan_backend: str = "auto", **_lm_eval_extras):
        super().__init__()
        if backbone is None:
            raise ValueError("model 'mambapeft' needs --model_args backbone=<directory of a Mamba LM checkpoint>")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for "cuda" unless told otherwise, as its HFLM does
            log.warning("device %r requested but no CUDA device is visible: evaluating on the CPU", device)
            device = "cpu"
        self._device = resolve_device(device or "auto")
        model = load_lm_with_adapter(backbone, adapter, self._device, scan_backend)
        self._setup(model, load_tokenizer(tokenizer or backbone), autocast_for(self._device),
                    batch_size, max_length, max_gen_toks)

    @classmethod
    def wrap(cls, model: MambaLMHeadModel, tokenizer: TextTokenizer, *, device: torch.device, autocast,
             batch_size: int, max_length: int = 2048, max_gen_toks: int = 256) -> MambaPeftLM:
        """An adapter around a model already in memory (a training job's, just trained)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._device = device
        lm._setup(model, tokenizer, autocast, batch_size, max_length, max_gen_toks)
        return lm

    def _setup(self, model, tokenizer, autocast, batch_size, max_length, max_gen_toks) -> None:
        if str(batch_size).startswith("auto"):
            raise ValueError("model 'mambapeft' takes a fixed --batch_size (a number), not 'auto'")
        self.model, self.text_tokenizer, self.autocast = model, tokenizer, autocast
        self.batch_size, self.max_length, self.max_gen_toks = int(batch_size), int(max_length), int(max_gen_toks)

    # -- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string)  # GPT-NeoX adds no special tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    # -- log-likelihoods ---------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_continuations(self.model, pairs, pad_id=self.text_tokenizer.pad_id, batch_size=self.batch_size,
                                   max_length=self.max_length, device=self._device, autocast=self.autocast)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring: the whole text in disjoint windows of ``max_length`` tokens."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(ll for ll, _ in self._score(windows)))
        return totals

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first stop string. Prompts of equal token length share
        a batch, so no padding ever enters the recurrent state."""
        prompts = [(self.tok_encode(context), kwargs) for context, kwargs in (r.args for r in requests)]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (ids, kwargs) in enumerate(prompts):
            groups[(len(ids), int(kwargs.get("max_gen_toks", self.max_gen_toks)))].append(i)
        outputs = [""] * len(prompts)
        for (_, max_new), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                ids = torch.tensor([prompts[i][0] for i in chunk], device=self._device)
                with self.autocast():
                    generated = self.model.generate(ids, max_new, stop_ids=(self.eot_token_id,))
                for i, row in zip(chunk, generated.tolist()):
                    outputs[i] = _cut_at_stops(self.tok_decode([t for t in row if t != self.eot_token_id]),
                                               prompts[i][1].get("until"))
        return outputs


def _cut_at_stops(text: str, until) -> str:
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
