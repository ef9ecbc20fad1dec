"""Offline language stand-ins: one small synthetic world, told as plain text and asked about.

The world (a function of the seed) holds about forty things, each with a fixed category (an apple
is a fruit) and a colour, size and place drawn from the seed, plus people who own, buy and give
away countable items. Three products share it:

- `pretrain_corpus`: declarative English about the world and small sums told as stories, the
  upstream corpus of the tiny Mamba LM. It has no question/answer layout and no prompt template;
  yes/no appear only in reported speech ("Mia said yes, the apple is red."), which is what gives a
  pretrained model a chance on BoolQ-style questions zero-shot. Like web text, it also uses the
  prompt formats' words in prose ("Please choose the correct answer, Tom said.") and their layout
  (headings, indented lines) in notes, so that every prompt token has a trained embedding.
- `write_mini_commonsense`: `commonsense_170k.json` in the LLM-Adapters format (the instruction
  styles of its BoolQ, Social IQa, PIQA, WinoGrande and HellaSwag parts) and two zero-shot eval sets
  in the Hugging Face record formats of real lm-eval tasks: `mini_arc` (ARC) and `mini_boolq` (BoolQ).
  lm-eval scores the text of each choice, never the answer labels ("answer2") that the training
  outputs end with, so fine-tuning can only help through what its texts teach (train on inputs):
  like HellaSwag, PIQA and Social IQa contexts, every training context states a thing's colour,
  size, place and category in the corpus's own sentences. The corpus told the model these facts
  only partly (about four in five colours and half the places are its best guess after
  pretraining), and the ARC choices are such sentences ("The pear is in the barn."), so a model
  that learns the facts better scores better. No test question is asked in training: the ARC
  questions ("Where is the pear?") never appear there, and training BoolQ questions avoid the test's.
- `write_mini_math`: `math_10k.json` (LLM-Adapters format, a short rationale ending in the number)
  and the test sets `mini_addsub` (one step) and `mini_multiarith` (two steps), numbers 0-20.

Use the same seed for the corpus and the tasks: the questions are about the corpus's world.
Every random choice comes from a numpy Generator seeded by (seed, purpose), so the same seed
writes byte-identical files.

Modules: `world` (the things, people and sentences stating facts), `corpus`, `commonsense`,
`math` (the word problems and the math data), `helpers` (seeded streams, picks, grammar) and
`writing` (files and manifests).
"""

from .commonsense import write_mini_commonsense
from .corpus import pretrain_corpus
from .math import write_mini_math
from .world import COLOURS, MAX_NUMBER, Thing, build_world

__all__ = ["COLOURS", "MAX_NUMBER", "Thing", "build_world", "pretrain_corpus", "write_mini_commonsense", "write_mini_math"]
