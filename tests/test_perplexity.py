"""Strided-window perplexity (eval/perplexity.py) against exp(mean NLL) computed directly and
against Hugging Face's perplexity guide, transcribed."""
import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mambapeft.eval.perplexity import perplexities, strided_nll, strided_windows
from mambapeft.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mamba2-mini", vocab_size=64).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 64, size=101).astype(np.uint16)


def nll(model, tokens, window, stride, batch_size=4):
    return strided_nll(model, tokens, window, stride, batch_size, CPU, contextlib.nullcontext)


@torch.no_grad()
def hf_guide(model, tokens, max_length, stride):
    """The guide's loop (transformers docs, "Perplexity of fixed-length models"), its model call
    written out: labels -100 outside the target, loss = mean cross-entropy after the causal shift.
    Each window's mean is weighted by the tokens it averaged."""
    encodings = torch.from_numpy(tokens.astype(np.int64))[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = model(input_ids)
        shift_labels = target_ids[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
        num_loss_tokens = int((shift_labels != -100).sum())
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@torch.no_grad()
def test_one_window_is_exp_of_the_mean_nll_over_the_sequence(model, tokens):
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    mean_nll = float(F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]))
    total, scored = nll(model, tokens, window=len(tokens), stride=len(tokens))
    assert scored == len(tokens) - 1
    assert perplexities(total, scored, None)["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(32, 16), (32, 7), (20, 19), (32, 32), (64, 50)])
def test_strided_windows_equal_the_guides_loop(model, tokens, window, stride):
    total, scored = nll(model, tokens, window, stride)
    reference, reference_count = hf_guide(model, tokens, window, stride)
    assert scored == reference_count and total == pytest.approx(reference, rel=1e-5)
    if stride < window:
        assert scored == len(tokens) - 1  # every token but the first, once


def test_windows_cover_each_token_once_and_batching_changes_nothing(model, tokens):
    windows = strided_windows(101, 32, 16)
    assert windows[0] == (0, 32, 31) and windows[1] == (16, 48, 16) and windows[-1][1] == 101
    assert sum(n for _, _, n in windows) == 100
    assert nll(model, tokens, 32, 16, batch_size=1) == pytest.approx(nll(model, tokens, 32, 16, batch_size=8), rel=1e-6)


def test_word_level_perplexity_divides_the_same_nll_by_words():
    result = perplexities(nll_sum=120.0, n_scored=60, n_words=40)
    assert result["perplexity"] == pytest.approx(math.exp(2.0)) and result["word_perplexity"] == pytest.approx(math.exp(3.0))
    assert "word_perplexity" not in perplexities(120.0, 60, None)
