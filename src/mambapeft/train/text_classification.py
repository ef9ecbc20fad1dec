"""Training a Mamba LM with a classification head on Yelp polarity (``data/yelp_polarity.py``), the
learnable-input study's real-data setting: the reviews of at most ``train_max_tokens`` tokens, read
from the dataset's token cache (built once per tokenizer, rule tokenize_labelled),
cross-entropy of the head's logits at each review's last token (``models/lm_classifier.py``). Its
evaluation, accuracy on the long reviews per length band, is ``eval/text_classification.py``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tokenizer import backbone_tokenizer_path, load_tokenizer
from ..data.yelp_polarity import cached_reviews
from .records import RecordTask


class TextClassificationTask(RecordTask):
    """The short training reviews of one run."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        data = spec["data"]
        self.tokenizer = load_tokenizer(backbone_tokenizer_path(spec["backbone"]))
        self.use_records(cached_reviews(data["tokens"], data["root"], "train", self.tokenizer,
                                        max_tokens=int(data["train_max_tokens"])))

    @staticmethod
    def count_examples(spec: dict) -> tuple[int | None, str]:
        """(training reviews, where the number comes from) for dry runs: which reviews are short
        depends on the tokenizer, so before training only the entry's nominal count is known."""
        data = spec["data"]
        if data.get("nominal_train_records"):
            return int(data["nominal_train_records"]) - int(spec["train"]["val_size"]), "config nominal_train_records"
        return None, "counted at training time (reviews of at most train_max_tokens tokens)"

    def _loss(self, model: nn.Module, records: list[dict], autocast) -> torch.Tensor:
        with autocast():
            logits = model.classify([r["tokens"] for r in records], self.tokenizer.pad_id)
        return F.cross_entropy(logits.float(), torch.tensor([r["label"] for r in records], device=self.device))
