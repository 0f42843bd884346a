"""Tokenizer loading, prompt templates, input building and collation.

Tiny tokenizers are trained in a tmp dir at test time (nothing is downloaded): a Llama-style
sentencepiece BPE model (unk 0, bos 1, eos 2, no pad) and a `tokenizers` byte-level BPE
tokenizer.json with the Llama-3 special tokens (the sp_dir / hf_dir fixtures of conftest.py).
"""

import json

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.config import preset
from cogvlm_jax.image_processing import preprocess_image
from cogvlm_jax.tokenization import (Tokenizer, build_conversation_input_ids, collate,
                                     history_to_prompt, load_tokenizer)


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
  return load_tokenizer(str(sp_dir))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  return load_tokenizer(str(hf_dir))


# ---- loading ---------------------------------------------------------------------------


def test_sentencepiece_special_ids(sp_dir, sp_tok):
  import sentencepiece as spm
  assert sp_tok.kind == "sentencepiece"
  assert (sp_tok.bos_token_id, sp_tok.eos_token_id) == (1, 2)
  assert sp_tok.pad_token_id == 0  # pad -1 falls back to unk, like Vicuna
  assert sp_tok.vocab_size == 150
  sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
  text = "Question: What is in the image? Answer:"
  ids = sp_tok.encode(text)
  assert ids == sp.encode(text)
  assert sp.id_to_piece(ids[0]).startswith("\u2581")  # dummy prefix, no BOS
  assert 1 not in ids and 2 not in ids
  # The model file can also be given directly.
  assert load_tokenizer(str(sp_dir / "tokenizer.model")).encode(text) == ids


def test_sentencepiece_decode(sp_tok):
  ids = sp_tok.encode("the cat sat on the mat")
  assert sp_tok.decode(ids) == "the cat sat on the mat"
  assert sp_tok.decode([1] + ids + [2]) == "the cat sat on the mat"
  assert sp_tok.decode([1] + ids + [2], skip_special_tokens=False) == (
      "<s>the cat sat on the mat</s>")


def test_tokenizers_json_llama3_defaults(hf_tok):
  assert hf_tok.kind == "tokenizers"
  assert hf_tok.bos_token_id == hf_tok.token_to_id("<|begin_of_text|>") == 0
  assert hf_tok.eos_token_id == hf_tok.token_to_id("<|end_of_text|>") == 1
  assert hf_tok.pad_token_id is None
  assert hf_tok.vocab_size == hf_tok.backend.get_vocab_size(with_added_tokens=True)
  ids = hf_tok.encode("Question: a red car Answer:")
  assert ids == hf_tok.backend.encode("Question: a red car Answer:", add_special_tokens=False).ids
  assert ids[0] != hf_tok.bos_token_id  # the post-processor's BOS is not added
  assert hf_tok.decode([0] + ids + [1]) == "Question: a red car Answer:"


def test_tokenizers_json_config_files_and_overrides(hf_dir, tmp_path):
  import shutil
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  # tokenizer_config.json (AddedToken dict form) beats special_tokens_map.json.
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<|end_of_text|>", "eos_token": "<|begin_of_text|>"}))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|pad|>", "special": True}, "pad_token": "<|pad|>"}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.bos_token_id == 1  # only named in special_tokens_map.json
  assert tok.eos_token_id == 2 and tok.pad_token_id == 2
  # Explicit overrides beat the files.
  tok = load_tokenizer(str(tmp_path / "tokenizer.json"), bos_token="<|begin_of_text|>",
                       eos_token="<|end_of_text|>")
  assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    load_tokenizer(str(tmp_path), eos_token="<|eot_id|>")


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    load_tokenizer(str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg and "tokenizer.model" in msg and "tokenizer.json" in msg
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nope"))


# ---- templates -------------------------------------------------------------------------

_HISTORY = [("What is it?", "A cat."), ("Color?", "Red")]


def test_templates_by_hand():
  assert history_to_prompt("base", None, "Describe it") == "Describe it"
  assert history_to_prompt("base", _HISTORY, "Describe it") == "Describe it"
  assert history_to_prompt("chat", [], "Describe it") == "Question: Describe it Answer:"
  assert history_to_prompt("chat", _HISTORY, "Where?") == (
      "Question: What is it? Answer: A cat.\nQuestion: Color? Answer: Red\n"
      "Question: Where? Answer:")
  assert history_to_prompt("vqa", None, "How many?") == "Question: How many? Short answer:"
  assert history_to_prompt("vqa", _HISTORY[:1], "How many?") == (
      "Question: What is it? Short answer: A cat.\nQuestion: How many? Short answer:")


def test_unknown_template():
  with pytest.raises(ValueError) as e:
    history_to_prompt("chatml", None, "hi")
  assert all(t in str(e.value) for t in ("base", "chat", "vqa"))


# ---- building inputs -------------------------------------------------------------------


@pytest.mark.parametrize("name,tok_fixture,placeholder", [
    ("tiny-cogvlm", "sp_tok", 0), ("tiny-cogvlm2", "hf_tok", 128002)])
def test_layout_with_image(request, name, tok_fixture, placeholder):
  tok = request.getfixturevalue(tok_fixture)
  config = preset(name)
  g = config.vision.image_size // config.vision.patch_size
  span = (g // 2) ** 2 + 2 if config.variant == "cogvlm2" else g * g + 2
  assert config.image_span_length == span
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
  out = build_conversation_input_ids(tok, config, query="What is in the image?",
                                     history=_HISTORY, image=img)
  prompt = history_to_prompt("chat", _HISTORY, "What is in the image?")
  text = tok.encode(prompt)
  ids, tt = out["input_ids"], out["token_type_ids"]
  assert ids.dtype == np.int32 and tt.dtype == np.int32
  assert ids.tolist() == [tok.bos_token_id] + [placeholder] * span + text
  assert tt.tolist() == [0] + [1] * span + [0] * len(text)
  assert out["attention_mask"].tolist() == [1] * len(ids)
  assert out["attention_mask"].dtype == np.int32
  S = config.vision.image_size
  assert out["images"].shape == (S, S, 3) and out["images"].dtype == np.float32
  np.testing.assert_array_equal(out["images"], preprocess_image(img, S))
  assert "loss_mask" not in out


def test_layout_without_image_and_template_override(sp_tok):
  config = preset("tiny-cogvlm")
  out = build_conversation_input_ids(sp_tok, config, query="Describe it", history=_HISTORY,
                                     template_version="base")
  assert out["input_ids"].tolist() == [1] + sp_tok.encode("Describe it")
  assert out["token_type_ids"].tolist() == [0] * len(out["input_ids"])
  assert "images" not in out
  # The default template comes from the config.
  out = build_conversation_input_ids(sp_tok, config.replace(template_version="vqa"),
                                     query="How many?", image=[])
  assert out["input_ids"].tolist() == [1] + sp_tok.encode("Question: How many? Short answer:")


def test_image_from_path(sp_tok, tmp_path):
  config = preset("tiny-cogvlm")
  p = tmp_path / "x.png"
  Image.new("RGB", (9, 5), (10, 200, 30)).save(p)
  out = build_conversation_input_ids(sp_tok, config, query="q", image=str(p))
  np.testing.assert_array_equal(out["images"], preprocess_image(str(p), 16))


@pytest.mark.parametrize("tok_fixture,name", [("sp_tok", "tiny-cogvlm"),
                                              ("hf_tok", "tiny-cogvlm2")])
def test_loss_mask_covers_answer_and_eos(request, tok_fixture, name):
  tok = request.getfixturevalue(tok_fixture)
  config = preset(name)
  img = Image.new("RGB", (8, 8))
  out = build_conversation_input_ids(tok, config, query="What color?", image=img,
                                     answer="red car")
  prompt_ids = tok.encode("Question: What color? Answer:")
  answer_ids = tok.encode("red car") + [tok.eos_token_id]
  n_prefix = 1 + config.image_span_length + len(prompt_ids)
  ids = out["input_ids"].tolist()
  assert ids[n_prefix:] == answer_ids and len(ids) == n_prefix + len(answer_ids)
  assert out["loss_mask"].tolist() == [0] * n_prefix + [1] * len(answer_ids)
  assert out["token_type_ids"][n_prefix:].tolist() == [0] * len(answer_ids)


def test_two_images_rejected(sp_tok):
  img = Image.new("RGB", (8, 8))
  with pytest.raises(ValueError, match="one image per conversation"):
    build_conversation_input_ids(sp_tok, preset("tiny-cogvlm"), query="q", image=[img, img])


def test_unknown_template_in_builder(sp_tok):
  with pytest.raises(ValueError, match="unknown template_version"):
    build_conversation_input_ids(sp_tok, preset("tiny-cogvlm"), query="q",
                                 template_version="llava")


# ---- collation -------------------------------------------------------------------------


def test_collate_left_padding(sp_tok):
  config = preset("tiny-cogvlm")
  img = Image.new("RGB", (8, 8), (255, 0, 0))
  a = build_conversation_input_ids(sp_tok, config, query="What is in the image?", image=img)
  b = build_conversation_input_ids(sp_tok, config, query="Hi")
  la, lb = len(a["input_ids"]), len(b["input_ids"])
  assert la > lb
  batch = collate([a, b], pad_id=7)
  assert batch["input_ids"].shape == (2, la) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["input_ids"][0], a["input_ids"])
  assert batch["input_ids"][1].tolist() == [7] * (la - lb) + b["input_ids"].tolist()
  assert batch["token_type_ids"][1].tolist() == [0] * la
  assert batch["attention_mask"][1].tolist() == [0] * (la - lb) + [1] * lb
  assert batch["images"].shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(batch["images"][0], a["images"])
  np.testing.assert_array_equal(batch["images"][1], 0)
  assert batch["has_image"].tolist() == [True, False]
  assert "loss_mask" not in batch


def test_collate_pad_to_right_pad_and_loss_mask(sp_tok):
  config = preset("tiny-cogvlm")
  a = build_conversation_input_ids(sp_tok, config, query="Color?", answer="red")
  b = build_conversation_input_ids(sp_tok, config, query="Hi")
  la, lb = len(a["input_ids"]), len(b["input_ids"])
  batch = collate([a, b], pad_to=la + 3, left_pad=False)
  assert batch["input_ids"].shape == (2, la + 3)
  assert batch["input_ids"][0].tolist() == a["input_ids"].tolist() + [0] * 3
  assert batch["attention_mask"][1].tolist() == [1] * lb + [0] * (la + 3 - lb)
  assert batch["loss_mask"][0].tolist() == a["loss_mask"].tolist() + [0] * 3
  assert batch["loss_mask"][1].tolist() == [0] * (la + 3)
  assert "images" not in batch and "has_image" not in batch
  left = collate([a, b], pad_to=la + 3)
  assert left["loss_mask"][0].tolist() == [0] * 3 + a["loss_mask"].tolist()
  with pytest.raises(ValueError, match="pad_to"):
    collate([a, b], pad_to=la - 1)


def test_collate_all_images(sp_tok):
  config = preset("tiny-cogvlm")
  s = [build_conversation_input_ids(sp_tok, config, query=q, image=Image.new("RGB", (4, 4), c))
       for q, c in (("a", (0, 0, 0)), ("b c", (255, 255, 255)))]
  batch = collate(s)
  assert batch["images"].shape == (2, 16, 16, 3) and batch["images"].dtype == np.float32
  assert batch["has_image"].tolist() == [True, True]
  np.testing.assert_array_equal(batch["images"][1], s[1]["images"])


def test_tokenizer_class_exported():
  assert isinstance(Tokenizer, type)


def test_built_prompts_run_through_model_and_generate(sp_tok):
  """End to end: builder + collate (left padding, one text-only row) -> logits -> generate."""
  import jax.numpy as jnp
  from PIL import Image

  from cogvlm_jax.generate import generate
  from cogvlm_jax.pretrained import create_model

  cfg = preset("tiny-cogvlm", vocab_size=max(128, sp_tok.vocab_size))
  model = create_model(cfg)
  image = Image.new("RGB", (40, 30), (200, 30, 30))
  samples = [
      build_conversation_input_ids(sp_tok, cfg, query="what is it?", image=image),
      build_conversation_input_ids(sp_tok, cfg, query="a much longer question about the thing?",
                                   history=[("hi", "hello")], image=image),
      build_conversation_input_ids(sp_tok, cfg, query="no image here"),
  ]
  batch = collate(samples, pad_id=sp_tok.pad_token_id or 0)
  logits = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
                 jnp.asarray(batch["images"]), jnp.asarray(batch["attention_mask"]))
  assert logits.shape == batch["input_ids"].shape + (cfg.vocab_size,)
  assert bool(jnp.all(jnp.isfinite(logits)))
  out = generate(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                 batch["images"], max_new_tokens=4)
  assert out.shape == (3, batch["input_ids"].shape[1] + 4)
