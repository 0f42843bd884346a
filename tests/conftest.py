"""pytest setup shared by every test module: the simulated devices, the import path, the
`slow` marker and the fixtures that several modules use.

The full suite (what CI runs) is `pytest -q tests -n 2` (pytest-xdist, 2 processes). For a
quick local run, leave out the tests marked slow (each takes more than ~20 s on a 2-core CPU
machine):

  pytest -q tests -m "not slow"
"""

import os
import sys

# Simulate 8 CPU devices so sharding tests run on a laptop or CI machine. XLA reads this flag
# once, when the JAX backend starts, so it must be set before anything imports jax; pytest
# imports this conftest before any test module. A device count set by the user is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# The tests run on CPU. Where libtpu is importable (jax[tpu]), JAX would otherwise try to
# start a TPU first (warnings, seconds of delay). The TPU compile tests load libtpu by path.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from tests.helpers import SMALL_SPEC, tokenizer_sentences  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s on CPU; deselect with -m \"not slow\"")


# ---- the demo data (test_train_*) --------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A small demo split (SMALL_SPEC), generated once per test session."""
  from cogvlm_jax.data import demo

  folder = str(tmp_path_factory.mktemp("demo") / "data")
  spec = demo.DemoSpec(**SMALL_SPEC)
  demo.ensure_demo_data(folder, spec, verbose=False)
  return folder


# ---- tiny tokenizers, trained at test time (nothing is downloaded) -----------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  """A folder with a Llama-style sentencepiece BPE tokenizer.model (unk 0, bos 1, eos 2, no pad)."""
  import sentencepiece as spm

  d = tmp_path_factory.mktemp("sp")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(tokenizer_sentences()), model_prefix=str(d / "tokenizer"),
      vocab_size=150, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
  return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A folder with a byte-level BPE tokenizer.json carrying the Llama-3 special tokens."""
  import tokenizers as tk

  d = tmp_path_factory.mktemp("hf")
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=200, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(tokenizer_sentences(), trainer)
  # Like Llama-3: encode() with special tokens would prepend BOS; ours must not.
  tok.post_processor = tk.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
  tok.save(str(d / "tokenizer.json"))
  return d
