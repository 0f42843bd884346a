"""The demo's tokenizer: a Llama-style sentencepiece BPE trained on texts of demo scenes.

unk 0, bos 1, eos 2, no pad piece, split digits, byte fallback, exactly VOCAB_SIZE pieces. It
is trained on a corpus of its own (`tokenizer_corpus`: scenes from a seed stream no split
uses, texts only), so it does not depend on the number of scenes in the splits.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np

from cogvlm_jax.data.demo.scenes import all_words, sample_scene, scene_records

VOCAB_SIZE = 512  # configs/demo.py sets the model's vocab_size to this
TOKENIZER_FILE = "tokenizer.model"
# The seed stream of the corpus: [seed, CORPUS_STREAM]. The splits use streams 0 and 1
# (storage.SPLITS), so this one is 2 and never shares scenes with them.
CORPUS_STREAM = 2


def tokenizer_corpus(seed: int, num_scenes: int = 2000) -> list[str]:
  """Texts the tokenizer is trained on: the prompt and the answer of every record of
  `num_scenes` scenes (nothing rendered); a list of str."""
  from cogvlm_jax.tokenization import history_to_prompt

  rng = np.random.default_rng([seed, CORPUS_STREAM])
  texts = []
  for i in range(num_scenes):
    for r in scene_records(sample_scene(rng), rng, str(i), ""):
      prompt = history_to_prompt(r["template"], None, r["query"])
      texts += [prompt, r["answer"]] if prompt else [r["answer"]]
  return texts


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int = VOCAB_SIZE) -> None:
  """Writes a Llama-style sentencepiece BPE model with exactly `vocab_size` pieces to `path`."""
  import sentencepiece as spm

  model = io.BytesIO()
  # One line with every word the generator can emit: no demo text ever needs byte fallback.
  sentences = list(texts) + [" ".join(all_words())]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
      add_dummy_prefix=True, remove_extra_whitespaces=False, hard_vocab_limit=True,
      shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
