"""Zero-shot multiple-choice scoring by log-likelihood, as lm-evaluation-harness's HFLM does it.

For each (context, continuation) request: encode ``context + continuation`` and ``context``; the
continuation tokens are the tail of the whole encoding beyond the context's (lm-eval
``_encode_pair``, with trailing spaces of the context moved to the continuation). The score is the
sum of the continuation tokens' log-probabilities. ``acc`` picks the highest score, ``acc_norm``
the highest score divided by the choice's length in characters.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if not context_ids:  # lm-eval scores an empty context after the end-of-text token
        return [tokenizer.eos_id], whole
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int, max_length: int,
                   device: torch.device, autocast: Callable) -> list[float]:
    """Sum of log p(continuation | context) for every request, in request order."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        sequences = [(encoded[i][0] + encoded[i][1])[-(max_length + 1):] for i in chunk]
        n_cont = [len(encoded[i][1]) for i in chunk]
        inputs = [s[:-1] for s in sequences]  # position t predicts token t+1
        width = max(len(s) for s in inputs)
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        for row, s in enumerate(inputs):  # right padding: causal, so it cannot affect earlier positions
            ids[row, :len(s)] = torch.tensor(s)
        with autocast():
            hidden = model.forward_hidden(ids.to(device))  # (B, L, D)
        for row, (s, n) in enumerate(zip(sequences, n_cont)):
            positions = torch.arange(len(s) - 1 - n, len(s) - 1, device=device)
            logits = model.lm_head(hidden[row, positions]).float()  # (n, V)
            targets = torch.tensor(s[-n:], device=device)
            scores[chunk[row]] = float(F.log_softmax(logits, -1).gather(1, targets[:, None]).sum())
    return scores


def evaluate_choice_task(model, tokenizer, task, docs: list[dict], **kwargs) -> dict:
    """acc and acc_norm (percent) of one multiple-choice task over ``docs``."""
    requests, spans = [], []
    for doc in docs:
        pairs = task.requests(doc)
        spans.append((len(requests), len(pairs)))
        requests.extend(pairs)
    scores = loglikelihoods(model, tokenizer, requests, **kwargs)
    correct = correct_norm = 0
    for doc, (start, n) in zip(docs, spans):
        lls = scores[start:start + n]
        lengths = [float(len(choice)) for choice in task.choices(doc)]
        gold = task.gold(doc)
        correct += int(max(range(n), key=lambda i: lls[i]) == gold)
        correct_norm += int(max(range(n), key=lambda i: lls[i] / lengths[i]) == gold)
    return {"acc": 100.0 * correct / len(docs), "acc_norm": 100.0 * correct_norm / len(docs), "n": len(docs)}
