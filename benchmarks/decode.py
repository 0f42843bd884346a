"""Generated tokens/s with the KV cache: cogvlm_jax `generate` vs the PyTorch reference.

Same config, same random weights, same prompts (an image + text), greedy, no stop token, in
the same process; batch 1 and 8. Our first call compiles and is not timed (a server
compiles once); each side's best of REPEATS runs is reported, and the ratio.

    python benchmarks/decode.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from cogvlm_jax.config import preset
from cogvlm_jax.convert.hf import hf_to_state
from cogvlm_jax.generate import generate
from cogvlm_jax.pretrained import abstract_model
from tests.reference import modeling_cogvlm_ref as ref

NEW_TOKENS = 64
REPEATS = 3


def bench_config():
  return preset("tiny-cogvlm", hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=8, num_hidden_layers=4, vocab_size=8192,
                vision=dict(image_size=56, patch_size=14, hidden_size=128, num_heads=4,
                            intermediate_size=256, num_hidden_layers=2))


def prompts(cfg, batch: int, text_len: int = 24):
  rng = np.random.default_rng(0)
  span = cfg.image_span_length
  ids = np.concatenate([np.full((batch, 1), cfg.bos_token_id),
                        np.full((batch, span), cfg.image_placeholder_id),
                        rng.integers(3, cfg.vocab_size, (batch, text_len))], axis=1)
  types = np.zeros_like(ids)
  types[:, 1:1 + span] = 1
  images = rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
  return ids.astype(np.int64), types.astype(np.int64), np.ones_like(ids), images.astype(
      np.float32)


def best_time(fn) -> float:
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  cfg = bench_config()
  torch.manual_seed(0)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_(torch_model, 0)
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  graphdef, abstract = abstract_model(cfg)
  model = nnx.merge(graphdef, hf_to_state(cfg, tensors, abstract))
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {NEW_TOKENS} new tokens, best of {REPEATS}")
  for batch in (1, 8):
    ids, types, mask, images = prompts(cfg, batch)

    def ours():
      return generate(model, ids, types, mask, images, max_new_tokens=NEW_TOKENS,
                      stop_token_ids=[-1])

    def theirs():
      with torch.no_grad():
        return ref.generate_greedy(torch_model, torch.from_numpy(ids), torch.from_numpy(types),
                                   torch.from_numpy(mask),
                                   torch.from_numpy(images.transpose(0, 3, 1, 2)), NEW_TOKENS,
                                   eos_token_id=-1).numpy()

    same = np.array_equal(ours(), theirs())  # also compiles ours
    ours_s, theirs_s = best_time(ours), best_time(theirs)
    tokens = batch * NEW_TOKENS
    print(f"batch {batch}: cogvlm_jax {tokens / ours_s:8.1f} tok/s, PyTorch reference "
          f"{tokens / theirs_s:8.1f} tok/s, ratio {theirs_s / ours_s:.2f}x, "
          f"same tokens: {same}")


if __name__ == "__main__":
  main()
