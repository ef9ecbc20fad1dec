"""Greedy decoding in step mode with static buffers, so that the decode step can be captured once as
a CUDA graph and replayed for every token (what mamba_ssm's ``generate(cg=True)`` does for its own
model). Every PEFT method's step mode runs as it is: inserted input tokens (prefix, periodic) are
fed through a second captured graph, scan-side adapters (affix, additional-scan) live in the
mixers' step and state.

A graph replays the kernels on the tensors it was captured with, so everything it reads and writes
is allocated once here: the recurrent states, the current token ids and an inserted-token buffer.
Mixers may return a new state tensor from a step (``state.conv = ...``); the step copies it back
into the captured buffer, so a replay continues from the state the previous one left.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .lm import MambaLMHeadModel


class GreedyDecoder:
    """Greedy decoding of ``batch`` rows with ``model``'s step mode; on CUDA (``cuda_graph``) the
    decode step is a CUDA graph captured at construction and reused by every :meth:`generate`.

    ``autocast``: a context factory every forward and step runs in (e.g. bf16 autocast; use
    ``cache_enabled=False`` with graphs, so no cast is cached across a capture).
    """

    def __init__(self, model: MambaLMHeadModel, batch: int, device: torch.device | str, *,
                 cuda_graph: bool = False, autocast: Callable = contextlib.nullcontext):
        self.model, self.batch, self.device, self.autocast = model, batch, torch.device(device), autocast
        self.states = model.empty_states(batch, self.device)
        self._buffers = [(state.conv, state.ssm) for state in self.states]
        self.token = torch.zeros(batch, dtype=torch.long, device=self.device)
        embedding = model.backbone.embedding.weight
        self.inserted = torch.zeros(batch, 1, embedding.shape[1], dtype=embedding.dtype, device=self.device)
        self._decode, self._insert = self._decode_step, self._insert_step
        if cuda_graph:  # each graph its own memory pool: they replay in any order
            self._decode = _captured(self._decode_step)
            if model.backbone.input_tokens is not None:
                self._insert = _captured(self._insert_step)

    def _keep_buffers(self) -> None:
        """Copy a step's new state tensors into the buffers a graph captured, and point back at them."""
        for state, (conv, ssm) in zip(self.states, self._buffers):
            if state.conv is not conv:
                conv.copy_(state.conv)
                state.conv = conv
            if state.ssm is not ssm:
                ssm.copy_(state.ssm)
                state.ssm = ssm

    def _decode_step(self) -> None:
        """token (B,) -> the next greedy token, written back into ``token``; advances the states."""
        backbone = self.model.backbone
        with self.autocast():
            hidden = backbone.step_embedded(backbone.embedding(self.token).unsqueeze(1), self.states)
            logits = self.model.lm_head(hidden[:, 0])
        self.token.copy_(logits.argmax(-1))
        self._keep_buffers()

    def _insert_step(self) -> None:
        """Feed the embedded token in ``inserted`` (B, 1, D) (prefix/periodic); advances the states."""
        with self.autocast():
            self.model.backbone.step_embedded(self.inserted, self.states)
        self._keep_buffers()

    def _feed_inserted_tokens(self, position: int) -> None:
        """The learnable tokens the model inserts before the real token at ``position``, if any
        (as ``MambaLMHeadModel._step_token``)."""
        input_tokens = self.model.backbone.input_tokens
        extra = None if input_tokens is None else input_tokens.tokens_before(position)
        for token in () if extra is None else extra:  # (D,) each
            self.inserted.copy_(token.expand_as(self.inserted))
            self._insert()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids (batch, P), all rows real tokens -> the greedy continuation (batch, max_new_tokens)."""
        if input_ids.shape[0] != self.batch:
            raise ValueError(f"GreedyDecoder was built for batch {self.batch}, got {input_ids.shape[0]} rows")
        length = input_ids.shape[1]
        prefill = self.model.empty_states(self.batch, self.device)
        with self.autocast():
            logits = self.model.lm_head(self.model.forward_hidden(input_ids, prefill)[:, -1])  # the last position only
        for state, filled in zip(self.states, prefill):
            state.conv.copy_(filled.conv)
            state.ssm.copy_(filled.ssm)
        self.token.copy_(logits.argmax(-1))
        out = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        if max_new_tokens:
            out[:, 0] = self.token
        for i in range(1, max_new_tokens):
            self._feed_inserted_tokens(length + i - 1)  # the token fed now sits at position length + i - 1
            self._decode()
            out[:, i] = self.token
        return out


@torch.no_grad()
def _captured(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` as a CUDA graph's replay: run twice on a side stream first (lazy initialisation,
    kernel autotuning and cuBLAS workspaces must not happen during capture), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
