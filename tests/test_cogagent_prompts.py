"""CogAgent's two image sizes through the one example builder: training rows, eval prompts,
eval's Generator and the chat command all carry cross_images (the same picture at Sx, or a
`cross_image` of its own). Tiny models, CPU, a few seconds each."""

import contextlib
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import cogvlm_jax
from cogvlm_jax import chat
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.examples import ExampleBuilder, render_turns
from cogvlm_jax.eval.generator import Generator
from cogvlm_jax.generate import generate
from cogvlm_jax.image_processing import preprocess_image
from cogvlm_jax.tokenization import build_conversation_input_ids, collate, load_tokenizer
from tests.helpers import tiny_demo_cogagent, write_hf_folder
from tests.reference import modeling_cogagent_ref as ref


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / demo.TOKENIZER_FILE)
  demo.train_tokenizer(demo.tokenizer_corpus(0, num_scenes=300), path)
  return ExampleBuilder(load_tokenizer(path), CogVLMConfig.from_dict(tiny_demo_cogagent()), 48)


def _picture(seed, size=(30, 20)):
  rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  return Image.fromarray(rgb)


def _png_bytes(image):
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def test_training_rows_carry_both_sizes(builder):
  pic = _picture(0)
  row = builder({"source": "t", "key": "0", "image_bytes": _png_bytes(pic), "query": "what?",
                 "answer": "a red circle", "template": "base"})
  assert row["images"].shape == (16, 16, 3) and row["cross_images"].shape == (24, 24, 3)
  for key, size in (("images", 16), ("cross_images", 24)):  # the reference's BICUBIC resize
    want = np.asarray(pic.resize((size, size), resample=Image.BICUBIC), np.uint8)
    np.testing.assert_array_equal(row[key], want)
  assert row["image_valid"] and row["cross_images"].dtype == np.uint8
  # The row starts with exactly the prompt eval later builds from the same picture.
  prompt = builder.prompt({"query": "what?", "template": "base", "image": pic})
  n = len(prompt["input_ids"])
  np.testing.assert_array_equal(row["input_ids"][:n], prompt["input_ids"])
  np.testing.assert_allclose(prompt["cross_images"], preprocess_image(pic, 24))


def test_text_only_and_bad_rows_get_a_masked_black_picture(builder):
  text_only = builder({"source": "t", "key": "1", "image": None, "image_bytes": None,
                       "turns": [("Hi", "Hello.")]})
  span = builder.model_config.image_span_length
  assert not text_only["image_valid"] and not text_only["bad_sample"]
  assert (text_only["token_type_ids"][1:1 + span] == 1).all()  # CogAgent rows keep the span
  assert not text_only["cross_images"].any() and not text_only["images"].any()
  bad = builder({"source": "t", "key": "2", "image_bytes": b"not an image", "caption": "x"})
  assert bad["bad_sample"] and bad["cross_images"].shape == (24, 24, 3)
  assert set(builder.placeholder()) == set(text_only)


def test_prompt_batch_equals_reference_builder_and_a_cross_image(builder):
  samples = [{"id": "a", "image": _picture(1), "template": "vqa", "query": "What color?"},
             {"id": "b", "image": _picture(2), "template": "chat", "query": "Where?",
              "history": [("Hi", "Hello.")], "cross_image": _picture(3, (50, 40))}]
  got = builder.prompt_batch(samples)
  want = collate([build_conversation_input_ids(
      builder.tokenizer, builder.model_config, query=s["query"], image=s["image"],
      history=s.get("history"), template_version=s["template"]) for s in samples])
  for key in ("input_ids", "token_type_ids", "attention_mask", "images"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_array_equal(got["cross_images"][0], want["cross_images"][0])
  np.testing.assert_allclose(got["cross_images"][1], preprocess_image(_picture(3, (50, 40)), 24))
  with pytest.raises(ValueError, match="CogAgent needs an image"):
    builder.prompt({"query": "text only", "template": "chat"})


def test_chat_turns_use_cogagents_template(builder):
  """The last turn of a CogAgent conversation row is the reference builder's prompt with
  that history, then the answer + EOS."""
  tok = builder.tokenizer
  turns = [("Describe it.", "A red circle."), ("Where is it?", "At the top.")]
  ids, mask = render_turns(tok, turns, "chat", "cogagent")
  ref_row = build_conversation_input_ids(tok, builder.model_config, query=turns[1][0],
                                         history=turns[:1], image=_picture(0),
                                         template_version="chat", answer=turns[1][1])
  tail = ref_row["input_ids"][1 + builder.model_config.image_span_length:]
  tail_prompt = tok.encode(" [INST] Where is it? [/INST] ")
  assert ids[-(len(tok.encode(turns[1][1])) + 1 + len(tail_prompt)):] == (
      tail_prompt + tok.encode(turns[1][1]) + [tok.eos_token_id])
  assert list(tail[-(len(tok.encode(turns[1][1])) + 1):]) == ids[-(len(tok.encode(turns[1][1])) + 1):]
  assert sum(mask) == len(tok.encode(turns[0][1])) + len(tok.encode(turns[1][1])) + 1


def _tiny_cogagent(vocab_size, seed=0):
  cfg = cogvlm_jax.preset("tiny-cogagent", vocab_size=vocab_size)
  torch.manual_seed(seed)
  torch_model = ref.CogAgentForCausalLM(cfg.to_hf_dict())
  ref.init_random_cogagent_(torch_model, seed)
  return cfg, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


def _greedy(model, tok, image, query, max_new_tokens, cross_image=None):
  """The answer tokens of the batch API (prompt from the reference builder)."""
  inputs = build_conversation_input_ids(tok, model.config, query=query, image=image)
  cross = inputs["cross_images"] if cross_image is None else preprocess_image(
      cross_image, model.config.cross_vision.image_size)
  out = generate(model, inputs["input_ids"][None], inputs["token_type_ids"][None], None,
                 inputs["images"][None], cross_images=cross[None],
                 max_new_tokens=max_new_tokens)[0, len(inputs["input_ids"]):]
  tokens = [int(t) for t in out]
  return tokens[:tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens


@pytest.mark.slow
def test_generator_passes_cross_images(sp_dir, tmp_path):
  tok = load_tokenizer(str(sp_dir))
  cfg, tensors = _tiny_cogagent(tok.vocab_size)  # every id decodes
  write_hf_folder(tmp_path / "ckpt", cfg.to_hf_dict(torch_dtype="float32"), tensors)
  model = cogvlm_jax.from_pretrained(str(tmp_path / "ckpt"))
  pics = [_picture(4), _picture(5)]
  gen = Generator(model, tok, batch_size=2, length_buckets=[64], max_new_tokens=5)
  samples = [{"id": str(i), "image": p, "query": "What is it?", "template": "chat"}
             for i, p in enumerate(pics)]
  answers = gen(samples)
  for pic, answer in zip(pics, answers):
    assert answer == tok.decode(_greedy(model, tok, pic, "What is it?", 5)).strip()


@pytest.mark.slow
def test_chat_cli_with_and_without_cross_image(sp_dir, tmp_path):
  cfg, tensors = _tiny_cogagent(load_tokenizer(str(sp_dir)).vocab_size)
  folder = tmp_path / "ckpt"
  write_hf_folder(folder, cfg.to_hf_dict(torch_dtype="float32"), tensors)
  shutil.copy(sp_dir / "tokenizer.model", folder / "tokenizer.model")
  image, sharp = tmp_path / "shot.png", tmp_path / "sharp.png"
  _picture(6).save(image)
  _picture(7, (60, 40)).save(sharp)
  model = cogvlm_jax.from_pretrained(str(folder))
  tok = load_tokenizer(str(folder))
  for extra, cross in (([], None), (["--cross_image", str(sharp)], str(sharp))):
    out = io.StringIO()
    assert chat.main(["--checkpoint", str(folder), "--image", str(image), "--query", "what?",
                      "--max-new-tokens", "6", *extra], stdout=out) == 0
    want = _greedy(model, tok, str(image), "what?", 6, cross_image=cross)
    assert out.getvalue() == tok.decode(want) + "\n"
  # Bad input: one line, exit status 2.
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = chat.main(["--checkpoint", str(folder), "--query", "hi"], stdout=io.StringIO())
  assert status == 2 and err.getvalue().startswith("error: CogAgent needs --image")
  assert len(err.getvalue().strip().splitlines()) == 1
