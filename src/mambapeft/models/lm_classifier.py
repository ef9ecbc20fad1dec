"""A Mamba LM with an n-way classification head: the learnable-input study's Yelp setup.

The head is a linear layer on the hidden state of each sequence's last real token (the last
position a causal model has read the whole review at; ``transformers``' sequence classifiers for
decoder models pool the same way). Inserted tokens (prefix / periodic) are removed from the hidden
states before pooling, so the pooled position is the review's own last token. The head always
trains (``classifier_names``), whichever PEFT method tunes the rest.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lm import MambaLMHeadModel


class MambaLMClassifier(MambaLMHeadModel):
    """The modules of a built (and loaded) Mamba LM, plus ``classifier``: Linear(d_model, num_classes)."""

    def __init__(self, lm: MambaLMHeadModel, num_classes: int):
        nn.Module.__init__(self)  # the LM's modules are adopted as they are (weights already loaded)
        self.config, self.backbone, self.lm_head = lm.config, lm.backbone, lm.lm_head
        weight = lm.lm_head.weight
        self.classifier = nn.Linear(lm.config.d_model, num_classes, device=weight.device, dtype=weight.dtype)

    def classifier_names(self) -> tuple[str, ...]:
        return ("classifier",)

    def classify(self, sequences: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """Logits (B, num_classes) of token sequences of any lengths (right-padded here: a causal
        model's output at a sequence's last token never sees the padding after it)."""
        device = self.classifier.weight.device
        lengths = torch.tensor([len(s) for s in sequences], device=device)
        ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
        for row, tokens in enumerate(sequences):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        hidden = self.forward_hidden(ids.to(device))  # (B, W, D): the real tokens only
        last = hidden[torch.arange(len(sequences), device=device), lengths - 1]  # (B, D)
        return self.classifier(last)
