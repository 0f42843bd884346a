"""The one example builder: generation prompts equal the reference builder + collate, and a
training example starts with exactly the prompt the model is later asked.

The demo tokenizer is trained in tmp (texts only, nothing rendered); a toy model config with
16px images. CPU, a few seconds.
"""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.examples import ExampleBuilder, pad_sequences
from cogvlm_jax.tokenization import build_conversation_input_ids, collate, load_tokenizer
from tests.helpers import tiny_demo_model


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / demo.TOKENIZER_FILE)
  demo.train_tokenizer(demo.tokenizer_corpus(0, num_scenes=300), path)
  cfg = CogVLMConfig.from_dict(tiny_demo_model())
  return ExampleBuilder(load_tokenizer(path), cfg, 48)


def _png(path, color):
  Image.new("RGBA", (20, 12), color).save(path)  # RGBA: the prompt drops alpha, as load_image
  return str(path)


def _reference_prompt(builder, sample):
  """What eval's Generator.build did: the reference builder, a black image when the file
  cannot be read."""
  try:
    return build_conversation_input_ids(builder.tokenizer, builder.model_config,
                                        query=sample["query"], image=sample.get("image"),
                                        template_version=sample["template"])
  except (OSError, ValueError):
    black = np.zeros((16, 16, 3), np.uint8)
    return build_conversation_input_ids(builder.tokenizer, builder.model_config,
                                        query=sample["query"], image=black,
                                        template_version=sample["template"])


def test_prompt_batch_equals_reference_builder_and_collate(builder, tmp_path, caplog):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  samples = [
      {"id": "a", "image": _png(tmp_path / "a.png", (200, 30, 30, 100)), "template": "vqa",
       "query": "What color is the circle?"},
      {"id": "b", "image": None, "template": "base", "query": "a red"},
      {"id": "c", "image": str(tmp_path / "missing.png"), "template": "base",
       "query": "Where is the blue square?"},
      {"id": "d", "image": str(bad), "template": "vqa", "query": "How many shapes are there?"},
  ]
  want = [_reference_prompt(builder, s) for s in samples]
  for pad_to, pad_id in ((None, None), (48, 7)):
    with caplog.at_level(logging.WARNING):
      got = builder.prompt_batch(samples, pad_to=pad_to, pad_id=pad_id)
    ref = collate(want, pad_to=pad_to, pad_id=0 if pad_id is None else pad_id)
    assert got.keys() == ref.keys() == {"input_ids", "token_type_ids", "attention_mask",
                                        "images", "has_image"}
    for k in ref:
      assert got[k].dtype == ref[k].dtype, k
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  assert list(got["has_image"]) == [True, False, True, True]
  assert got["input_ids"].shape == (4, 48) and (got["attention_mask"][:, -1] == 1).all()
  warned = [r.getMessage() for r in caplog.records if "black image" in r.getMessage()]
  assert len(warned) == 4 and "sample c" in warned[0] and "sample d" in warned[1], warned
  with pytest.raises(ValueError, match="longer than pad_to"):
    builder.prompt_batch(samples, pad_to=8)


def test_prompt_batch_buckets_and_filler_rows(builder):
  """What eval's Generator.prepare did: the smallest length bucket that fits, and a static
  batch filled up with copies of the first prompt."""
  samples = [{"id": "a", "image": None, "template": "vqa", "query": "What color is the circle?"},
             {"id": "b", "image": None, "template": "base", "query": "a"}]
  want = [_reference_prompt(builder, s) for s in samples]
  longest = max(len(w["input_ids"]) for w in want)
  buckets = (longest - 1, longest + 3, longest + 9)
  got = builder.prompt_batch(samples, pad_to=buckets, pad_id=5, rows=4)
  ref = collate(want + [want[0]] * 2, pad_to=longest + 3, pad_id=5)
  assert got.keys() == ref.keys() == {"input_ids", "token_type_ids", "attention_mask"}
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  assert got["input_ids"].shape == (4, longest + 3)
  with pytest.raises(ValueError, match=f"a prompt has {longest} tokens, longer than every"):
    builder.prompt_batch(samples, pad_to=(longest - 1,))
  with pytest.raises(ValueError, match="got 2 samples for 1 rows"):
    builder.prompt_batch(samples, rows=1)


def test_training_example_starts_with_the_generation_prompt(builder, tmp_path):
  """The same image and query: the training example's tokens before its answer are exactly
  the prompt, and its loss covers exactly the answer + EOS."""
  buf = io.BytesIO()
  Image.new("RGB", (20, 12), (40, 80, 220)).save(buf, "PNG")
  record = {"source": "s", "key": "k", "image_bytes": buf.getvalue(), "error": None,
            "template": "vqa", "query": "What color is the square?", "answer": "blue"}
  ex = builder(record)
  prompt = builder.prompt({"image": Image.open(io.BytesIO(buf.getvalue())),
                           "template": "vqa", "query": record["query"]})
  n = len(prompt["input_ids"])
  for k in ("input_ids", "token_type_ids", "attention_mask"):
    np.testing.assert_array_equal(ex[k][:n], prompt[k], err_msg=k)
  answer = builder.tokenizer.encode("blue") + [builder.tokenizer.eos_token_id]
  assert list(ex["input_ids"][ex["loss_mask"] == 1]) == answer
  assert list(np.nonzero(ex["loss_mask"])[0]) == list(range(n, n + len(answer)))
  # uint8 pixels for training (normalised on device); the prompt's are normalised here.
  assert ex["images"].dtype == np.uint8 and prompt["images"].dtype == np.float32


def test_pad_sequences_left_and_right():
  built = {"input_ids": np.asarray([1, 5, 6], np.int32),
           "attention_mask": np.ones(3, np.int32)}
  right = pad_sequences(built, 5, pad_id=9)
  left = pad_sequences(built, 5, pad_id=9, left=True)
  assert list(right) == list(left) == ["input_ids", "attention_mask"]  # only keys it has
  assert right["input_ids"].tolist() == [1, 5, 6, 9, 9]
  assert left["input_ids"].tolist() == [9, 9, 1, 5, 6]
  assert left["attention_mask"].tolist() == [0, 0, 1, 1, 1]
  assert left["input_ids"].dtype == np.int32
