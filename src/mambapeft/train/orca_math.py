"""Fine-tuning on Orca-Math as the study's SFT script did: every training text is question + answer
(``data/orca_math.py``), read from the token cache built once per dataset and tokenizer
(``data/token_cache.py``, layout ``documents``: each text followed by eos), truncated to
``cutoff_len`` tokens (the SFT trainer's 1024), loss on every token. Batching, loss and
validation are the instruction fine-tuning's (:class:`LanguageTask`)."""
from __future__ import annotations

import numpy as np

from ..data.errors import DataError
from ..data.instruct import split_train_val
from ..data.token_cache import load_tokens, read_token_meta
from ..io import sha256_file
from .language import LanguageTask


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The eos-terminated documents of a ``documents`` token array, each with its eos."""
    ends = np.flatnonzero(tokens == eos_id) + 1
    return [tokens[start:end] for start, end in zip(np.concatenate([[0], ends[:-1]]), ends)]


class OrcaMathTask(LanguageTask):
    def examples(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """int64 arrays, not lists: 200k Orca-Math texts as Python ints would take several GB."""
        tokens, meta = load_tokens(self.spec["data"]["tokens"])
        if meta["tokenizer_sha256"] != sha256_file(self.tokenizer.source):
            raise DataError(f"{self.spec['data']['tokens']} was tokenized with {meta['tokenizer']}, not with this "
                            f"backbone's tokenizer {self.tokenizer.source}; delete it and its .bin and re-run")
        cutoff = int(self.recipe["cutoff_len"])
        documents = [d[:cutoff].astype(np.int64) for d in split_documents(tokens, meta["eos_id"])]
        return split_train_val(documents, int(self.recipe["val_size"]), int(self.recipe["val_seed"]))

    @staticmethod
    def count_examples(spec: dict) -> tuple[int | None, str]:
        """(training texts, where the number comes from), from the cache's record when it exists (dry runs)."""
        data, val = spec["data"], int(spec["train"]["val_size"])
        try:
            return read_token_meta(data["tokens"])["n_documents"] - val, data["tokens"]
        except DataError:
            pass
        if data["source"] == "mini":
            return int(data["n_train"]) - val, "config (mini data not written yet)"
        if data.get("nominal_train_records"):
            return int(data["nominal_train_records"]) - val, "nominal size of the dataset (not tokenized yet)"
        return None, "unknown until the dataset is tokenized"
