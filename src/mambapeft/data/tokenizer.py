"""Byte-level BPE tokenizers: train the mini one, load it or the real GPT-NeoX one the same way.

The mini tokenizer is built like GPT-NeoX-20B's (the tokenizer of every Mamba LM): NFC
normaliser, ByteLevel pre-tokenizer / decoder / post-processor, and `<|endoftext|>` at id 0,
which is both eos and pad in MambaPEFT. It is saved as a `tokenizer.json` of the same format, so
`load_tokenizer` reads either file with the `tokenizers` library alone (no transformers, no network).
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mambapeft.data.errors import DataError
from mambapeft.io import atomic_path, write_bytes_atomic, write_text_atomic
from mambapeft.data.instruct import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

EOS_TOKEN = "<|endoftext|>"

# Fixed strings of the prompt formats (the Alpaca template, the LLM-Adapters instruction stems,
# lm-eval's question/answer cues): training on them keeps the format a handful of tokens, as a
# tokenizer trained on web text would, instead of byte fragments.
TEMPLATE_TEXTS = (
    PROMPT_WITH_INPUT.format(instruction="", input="", output=""),
    PROMPT_NO_INPUT.format(instruction="", output=""),
    "\nQuestion:", "\nAnswer:", "\nA:", "Q:", "the correct answer is", "Answer format:", "The answer is",
    "Please choose the correct answer to fill in the blank to complete the given sentence:",
    "Please answer the following question with true or false, question:",
    "Please choose the correct solution to the question:", "Please choose the correct answer to the question:",
    "Please choose the correct ending to complete the given sentence:",
    "Option1: Option2: option1/option2 Solution1: Solution2: solution1/solution2 true/false",
    "Answer1: Answer2: Answer3: Answer4: answer1/answer2/answer3/answer4 ending1/ending2/ending3/ending4",
)
# How often the template strings are repeated among the training texts, so their merges win.
TEMPLATE_WEIGHT = 50


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024, path: str | Path) -> None:
    """Train a GPT-NeoX-style byte-level BPE on `texts` (plus the prompt templates) and save it.

    `path` is the output `tokenizer.json` (or a directory to hold one). The vocabulary holds the 256
    byte symbols, `<|endoftext|>` at id 0 and the learned merges, `vocab_size` entries in all.
    """
    if vocab_size < 256 + 2:
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte symbols plus eos; use >= 258")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first special token -> id 0, as in GPT-NeoX
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_with_templates(texts), trainer=trainer)
    with atomic_path(_json_path(path, must_exist=False)) as temporary:
        tokenizer.save(str(temporary))


def _with_templates(texts: Iterable[str]) -> Iterator[str]:
    yield from texts
    for _ in range(TEMPLATE_WEIGHT):
        yield from TEMPLATE_TEXTS


def _json_path(path_or_dir: str | Path, must_exist: bool) -> Path:
    path = Path(path_or_dir)
    if path.is_dir() or (not must_exist and path.suffix != ".json"):
        path = path / "tokenizer.json"
    if must_exist and not path.is_file():
        raise DataError(
            f"{path}: tokenizer not found; build the mini one (mambapeft.data.tokenizer.build_tokenizer) "
            "or place GPT-NeoX-20B's tokenizer.json (EleutherAI/gpt-neox-20b on the Hugging Face Hub) there"
        )
    return path


class TextTokenizer:
    """Encode / decode with a byte-level BPE tokenizer.json; eos and pad are `<|endoftext|>`."""

    def __init__(self, tokenizer: Tokenizer, source: Path):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"{source}: tokenizer has no {EOS_TOKEN} token; use a GPT-NeoX-style tokenizer.json")
        self._tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = eos_id  # MambaPEFT sets pad_token_id=0, the eos of GPT-NeoX
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.source = source

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (GPT-NeoX adds none either)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def backbone_tokenizer_path(backbone: dict) -> str:
    """Where the tokenizer of a run's backbone entry is: its own ``tokenizer`` when given, else the
    checkpoint directory."""
    return backbone.get("tokenizer") or backbone["path"]


def load_tokenizer(path_or_dir: str | Path) -> TextTokenizer:
    """Load a tokenizer.json (or a directory holding one): the mini one or GPT-NeoX-20B's."""
    path = _json_path(path_or_dir, must_exist=True)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises plain Exception for any parse failure
        raise DataError(f"{path}: cannot read tokenizer ({error}); the file must be a Hugging Face tokenizer.json") from None
    return TextTokenizer(tokenizer, path)


def write_transformers_tokenizer(tokenizer: TextTokenizer, directory: str | Path) -> None:
    """The tokenizer as `transformers.AutoTokenizer.from_pretrained(directory)` reads it: the same
    tokenizer.json, with `<|endoftext|>` as bos, eos, unk and pad (as MambaPEFT and the -hf releases)."""
    directory = Path(directory)
    specials = {name: EOS_TOKEN for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
              **specials}
    write_bytes_atomic(directory / "tokenizer.json", tokenizer.source.read_bytes())
    write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    write_text_atomic(directory / "special_tokens_map.json", json.dumps(specials, indent=2))
