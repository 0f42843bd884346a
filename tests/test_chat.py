"""`python -m cogvlm_jax.chat`: one-shot and interactive, streaming, grounding boxes."""

import io
import shutil

import numpy as np
import torch
from PIL import Image

import cogvlm_jax
from cogvlm_jax import chat
from cogvlm_jax.data import examples
from cogvlm_jax.generate import generate
from tests.reference import modeling_cogvlm_ref as ref
from tests.helpers import write_hf_folder


def _checkpoint(tmp_path, sp_dir):
  cfg = cogvlm_jax.preset("tiny-cogvlm", vocab_size=160)
  torch.manual_seed(0)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict())
  ref.init_random_(torch_model, 0)
  folder = tmp_path / "ckpt"
  write_hf_folder(folder, cfg.to_hf_dict(torch_dtype="float32"),
                  {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
  shutil.copy(sp_dir / "tokenizer.model", folder / "tokenizer.model")
  image = tmp_path / "img.png"
  Image.new("RGB", (20, 24), (10, 200, 30)).save(image)
  return folder, image


def test_one_shot_streams_the_greedy_answer(tmp_path, sp_dir):
  folder, image = _checkpoint(tmp_path, sp_dir)
  out = io.StringIO()
  assert chat.main(["--checkpoint", str(folder), "--image", str(image), "--query", "what is it?",
                    "--max-new-tokens", "8"], stdout=out) == 0
  # The same answer through the batch API.
  model = cogvlm_jax.from_pretrained(str(folder))
  tok = cogvlm_jax.load_tokenizer(str(folder))
  inputs = cogvlm_jax.build_conversation_input_ids(tok, model.config, query="what is it?",
                                                   image=str(image))
  tokens = generate(model, inputs["input_ids"][None], inputs["token_type_ids"][None], None,
                    inputs["images"][None], max_new_tokens=8)[0, len(inputs["input_ids"]):]
  tokens = [int(t) for t in tokens]
  if tok.eos_token_id in tokens:
    tokens = tokens[:tokens.index(tok.eos_token_id)]
  assert out.getvalue() == tok.decode(tokens) + "\n"


def test_interactive_keeps_history_and_draws_boxes(tmp_path, sp_dir, monkeypatch):
  folder, image = _checkpoint(tmp_path, sp_dir)
  seen = []
  real = examples.build_conversation_input_ids  # chat builds prompts with ExampleBuilder

  def spy(*args, **kwargs):
    seen.append(list(kwargs["history"]))
    return real(*args, **kwargs)

  monkeypatch.setattr(examples, "build_conversation_input_ids", spy)
  out = io.StringIO()
  chat.main(["--checkpoint", str(folder), "--image", str(image), "--max-new-tokens", "3"],
            stdin=io.StringIO("first question\nsecond question\nclear\nthird\n\n"), stdout=out)
  assert [len(h) for h in seen] == [0, 1, 0]
  assert seen[1][0][0] == "first question"
  n = chat.draw_boxes(str(image), "the cat [[100,100,500,900]]", str(tmp_path / "boxes.png"))
  assert n == 1
  drawn = np.asarray(Image.open(tmp_path / "boxes.png"))
  assert tuple(drawn[12, 2]) == (255, 0, 0)  # left edge of the box at x = 0.1 * 20
