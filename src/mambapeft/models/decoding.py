"""Greedy decoding in step mode with static buffers, so that the decode steps can be captured once
as CUDA graphs and replayed (as mamba_ssm's ``generate(cg=True)`` does for its own model, one token
per replay). Here one replay generates ``steps_per_call`` tokens, the argmax inside the graph, so
the host neither syncs nor launches per token; a one-token graph does the remainder; the prompt's
parallel forward is a graph too (one per prompt length, captured at its first call). Every PEFT
method's step mode runs as it is: inserted input tokens (prefix, periodic) are fed through a
third captured graph, with one-token steps around each insertion; scan-side adapters (affix,
additional-scan) live in the mixers' step and state.

A graph replays the kernels on the tensors it was captured with, so everything it reads and writes
is allocated once here: the recurrent states, the current token ids, the tokens of a multi-step
replay and an inserted-token buffer. Mixers may return a new state tensor from a step
(``state.conv = ...``); the step copies it back into the captured buffer, so a replay continues
from the state the previous one left.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from .cuda_graphs import captured_replay
from .lm import MambaLMHeadModel
from .mamba import MixerState


class GreedyDecoder:
    """Greedy decoding of ``batch`` rows with ``model``'s step mode; on CUDA (``cuda_graph``) the
    decode steps are CUDA graphs captured at construction and reused by every :meth:`generate`
    (one of ``steps_per_call`` tokens, one of a single token), the prompt's forward one per prompt
    length, captured at the first :meth:`generate` with that length.

    ``autocast``: a context factory every forward and step runs in (e.g. bf16 autocast; use
    ``cache_enabled=False`` with graphs, so no cast is cached across a capture).
    ``state_dtype``: the recurrent states' storage (fp32 by default; the step computes in fp32 either
    way). bf16 halves the state traffic of each step, which dominates at large batch; it is what
    mamba_ssm's ``generate`` keeps (its inference cache has the model's dtype).
    """

    def __init__(self, model: MambaLMHeadModel, batch: int, device: torch.device | str, *,
                 cuda_graph: bool = False, autocast: Callable = contextlib.nullcontext, steps_per_call: int = 16,
                 state_dtype: torch.dtype = torch.float32):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be at least 1, got {steps_per_call}")
        self.model, self.batch, self.device, self.autocast = model, batch, torch.device(device), autocast
        self.steps_per_call, self.cuda_graph = steps_per_call, cuda_graph
        self._prefills: dict[int, tuple[torch.Tensor, Callable[[], None]]] = {}  # prompt length -> (ids buffer, run)
        self.states = [MixerState(s.conv.to(state_dtype), s.ssm.to(state_dtype))
                       for s in model.empty_states(batch, self.device)]
        self._buffers = [(state.conv, state.ssm) for state in self.states]
        self.token = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, steps_per_call, dtype=torch.long, device=self.device)
        embedding = model.backbone.embedding.weight
        self.inserted = torch.zeros(batch, 1, embedding.shape[1], dtype=embedding.dtype, device=self.device)
        self._decode, self._decode_many, self._insert = self._decode_step, self._decode_steps, self._insert_step
        if cuda_graph:  # each graph its own memory pool: they replay in any order
            with torch.no_grad():
                self._decode = captured_replay(self._decode_step)
                self._decode_many = captured_replay(self._decode_steps)
                if model.backbone.input_tokens is not None:
                    self._insert = captured_replay(self._insert_step)

    def _keep_buffers(self) -> None:
        """Copy a step's new state tensors into the buffers a graph captured, and point back at them."""
        for state, (conv, ssm) in zip(self.states, self._buffers):
            if state.conv is not conv:
                conv.copy_(state.conv)
                state.conv = conv
            if state.ssm is not ssm:
                ssm.copy_(state.ssm)
                state.ssm = ssm

    def _prefill_step(self, prompt: torch.Tensor) -> None:
        """prompt (B, P) through the parallel forward: the states after it, its greedy next token in ``token``."""
        filled = self.model.empty_states(self.batch, self.device)
        with self.autocast():
            logits = self.model.lm_head(self.model.forward_hidden(prompt, filled)[:, -1])  # the last position only
        for state, new in zip(self.states, filled):
            state.conv.copy_(new.conv)
            state.ssm.copy_(new.ssm)
        self.token.copy_(logits.argmax(-1))

    def _prefill(self, input_ids: torch.Tensor) -> None:
        """:meth:`_prefill_step` on ``input_ids``, through the ids buffer and (captured) run of its length."""
        length = input_ids.shape[1]
        if length not in self._prefills:
            prompt = torch.zeros_like(input_ids)
            run = functools.partial(self._prefill_step, prompt)
            self._prefills[length] = prompt, captured_replay(run) if self.cuda_graph else run
        prompt, run = self._prefills[length]
        prompt.copy_(input_ids)
        run()

    def _next_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> the next greedy token (B,); advances the states."""
        backbone = self.model.backbone
        with self.autocast():
            hidden = backbone.step_embedded(backbone.embedding(token).unsqueeze(1), self.states)
            logits = self.model.lm_head(hidden[:, 0])
        self._keep_buffers()
        return logits.argmax(-1)

    def _decode_step(self) -> None:
        """token (B,) -> the next greedy token, written back into ``token``."""
        self.token.copy_(self._next_token(self.token))

    def _decode_steps(self) -> None:
        """token (B,) -> the next ``steps_per_call`` greedy tokens, in ``tokens`` (B, steps_per_call);
        the last one also in ``token``."""
        token = self.token
        for i in range(self.steps_per_call):
            token = self._next_token(token)
            self.tokens[:, i].copy_(token)
        self.token.copy_(token)

    def _insert_step(self) -> None:
        """Feed the embedded token in ``inserted`` (B, 1, D) (prefix/periodic); advances the states."""
        with self.autocast():
            self.model.backbone.step_embedded(self.inserted, self.states)
        self._keep_buffers()

    def _inserted_before(self, position: int) -> torch.Tensor | None:
        """The learnable tokens (n, D) the model inserts before the real token at ``position``, or None."""
        input_tokens = self.model.backbone.input_tokens
        return None if input_tokens is None else input_tokens.tokens_before(position)

    def _feed_inserted_tokens(self, position: int) -> None:
        """The tokens inserted before the real token at ``position``, if any (as
        ``MambaLMHeadModel._step_token``)."""
        extra = self._inserted_before(position)
        for token in () if extra is None else extra:  # (D,) each
            self.inserted.copy_(token.expand_as(self.inserted))
            self._insert()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids (batch, P), all rows real tokens -> the greedy continuation (batch, max_new_tokens)."""
        if input_ids.shape[0] != self.batch:
            raise ValueError(f"GreedyDecoder was built for batch {self.batch}, got {input_ids.shape[0]} rows")
        length = input_ids.shape[1]
        self._prefill(input_ids)
        out = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        if max_new_tokens:
            out[:, 0] = self.token
        i, k = 1, self.steps_per_call
        while i < max_new_tokens:
            position = length + i - 1  # the token fed now sits at position length + i - 1
            if i + k <= max_new_tokens and self._uninterrupted(position, k):
                self._decode_many()
                out[:, i:i + k] = self.tokens
                i += k
            else:
                self._feed_inserted_tokens(position)
                self._decode()
                out[:, i] = self.token
                i += 1
        return out

    def _uninterrupted(self, position: int, count: int) -> bool:
        """Whether the model inserts no token before the ``count`` positions from ``position``."""
        return all(self._inserted_before(p) is None for p in range(position, position + count))
