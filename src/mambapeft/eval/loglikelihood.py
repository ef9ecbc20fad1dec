"""Log-likelihood of continuations given contexts, on token ids: the scoring behind zero-shot
multiple choice (lm-evaluation-harness's ``_loglikelihood_tokens``, as its HFLM computes it).

lm-eval turns each (context, continuation) string pair into token ids (the continuation is the tail
of ``encode(context + continuation)`` beyond ``encode(context)``) and asks for the sum of the
continuation tokens' log-probabilities and whether each of them is the greedy choice.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@torch.no_grad()
def score_continuations(model, pairs: list[TokenPair], *, pad_id: int, batch_size: int, max_length: int,
                        device: torch.device, autocast: Callable) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all continuation tokens greedy) per pair, in order.

    Longest sequences first, so a batch holds similar lengths; each sequence keeps its last
    ``max_length + 1`` tokens (lm-eval's left truncation), and batches are right-padded, which
    a causal model cannot see from the positions that are scored.
    """
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        sequences = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):] for i in chunk]
        inputs = [s[:-1] for s in sequences]  # position t predicts token t+1
        ids = torch.full((len(chunk), max(len(s) for s in inputs)), pad_id, dtype=torch.long)
        for row, s in enumerate(inputs):
            ids[row, :len(s)] = torch.tensor(s)
        with autocast():
            hidden = model.forward_hidden(ids.to(device))  # (B, L, D)
        for row, (i, s) in enumerate(zip(chunk, sequences)):
            n = len(pairs[i][1])
            positions = torch.arange(len(s) - 1 - n, len(s) - 1, device=device)
            log_probs = F.log_softmax(model.lm_head(hidden[row, positions]).float(), -1)  # (n, V)
            targets = torch.tensor(s[-n:], device=device)
            scores[i] = (float(log_probs.gather(1, targets[:, None]).sum()),
                         bool((log_probs.argmax(-1) == targets).all()))
    return scores
