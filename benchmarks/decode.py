"""Generated tokens/s with the KV cache: cogvlm_jax `generate` vs the PyTorch reference.

Same config, same random weights, same prompts (BOS + a 224 px image span + text, ~300
tokens), greedy, no stop token, in the same process; batch 1 and 8. Our first call
compiles and is not timed (a server compiles once); each side's best of --repeats runs.

Per batch it prints the prefill alone (prompt + image, up to the first token), the whole
generation, and the decode rate with the prefill taken out: tokens/s = batch x (new - 1) /
(generation - prefill). The goals (issue 16) are on that decode rate: batch 8 >= 4x the
reference, batch 1 >= 2x, and our batch 8 >= 5x our batch 1 (a cached step of a small
model is bound by reading the weights, so 8 rows should cost about what 1 row costs).
Last, the time to first token of a CogVLM2-shaped 1344 px prompt (9216 patches, 2306-token
image span) at reduced width.

    python benchmarks/decode.py [--repeats 3] [--new-tokens 64] [--layers 4] [--hidden 512]
"""

from __future__ import annotations

import _common  # noqa: F401  (puts the repository root on sys.path)

import argparse
import time

import jax
import numpy as np
import torch
from flax import nnx

from cogvlm_jax.config import preset
from cogvlm_jax.convert.hf import hf_to_state
from cogvlm_jax.generate import _jit_prefill, _prepare, generate
from cogvlm_jax.pretrained import abstract_model
from tests.reference import modeling_cogvlm_ref as ref


def bench_config(args):
  heads = args.hidden // 64
  return preset("tiny-cogvlm", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                num_attention_heads=heads, num_key_value_heads=heads,
                num_hidden_layers=args.layers, vocab_size=args.vocab,
                max_position_embeddings=2048,
                vision=dict(image_size=224, patch_size=14, hidden_size=128, num_heads=4,
                            intermediate_size=256, num_hidden_layers=2))


def cogvlm2_1344_config():
  """CogVLM2's 1344 px geometry (patch 14 -> 96 x 96 patches, 2x2 down -> 2306-token span)
  at reduced width, so it fits a CPU benchmark."""
  return preset("tiny-cogvlm2", hidden_size=256, intermediate_size=704,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096,
                vision=dict(image_size=1344, patch_size=14, hidden_size=64, num_heads=2,
                            intermediate_size=128, num_hidden_layers=2))


def model_pair(cfg):
  """(the PyTorch reference, our model with its weights) for `cfg`, seeded."""
  torch.manual_seed(0)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_(torch_model, 0)
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  graphdef, abstract = abstract_model(cfg)
  return torch_model, nnx.merge(graphdef, hf_to_state(cfg, tensors, abstract))


def prompts(cfg, batch: int, text_len: int = 24):
  """int64 ids / types / mask [batch, 1 + span + text_len], float32 images NHWC."""
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


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def runners(model, torch_model, ids, types, mask, images, new_tokens: int):
  """Callables: ours / theirs whole generation, ours / theirs prefill (to the first token)."""
  prepared = _prepare(model, ids, types, mask, images, new_tokens, [-1], None, 0.0, 0, 1.0)
  graphdef, state = nnx.split(model)
  t_ids, t_types, t_mask = (torch.from_numpy(a) for a in (ids, types, mask))
  t_images = torch.from_numpy(images.transpose(0, 3, 1, 2))

  def ours():
    return generate(model, ids, types, mask, images, max_new_tokens=new_tokens,
                    stop_token_ids=[-1])

  def theirs():
    with torch.no_grad():
      return ref.generate_greedy(torch_model, t_ids, t_types, t_mask, t_images, new_tokens,
                                 eos_token_id=-1).numpy()

  def ours_prefill():
    out = _jit_prefill(graphdef, state, *prepared[:4], jax.random.key(0),
                       max_new_tokens=new_tokens, sampling=prepared[6], mixed_batch=prepared[7])
    return jax.block_until_ready(out[0])

  def theirs_prefill():
    with torch.no_grad():  # one new token = the prompt's forward and its argmax
      return ref.generate_greedy(torch_model, t_ids, t_types, t_mask, t_images, 1,
                                 eos_token_id=-1)

  return ours, theirs, ours_prefill, theirs_prefill


def bench_batch(model, torch_model, cfg, batch: int, args) -> dict:
  """Times one batch size; returns decode tokens/s of both sides and prints a line."""
  ids, types, mask, images = prompts(cfg, batch)
  ours, theirs, ours_prefill, theirs_prefill = runners(model, torch_model, ids, types, mask,
                                                       images, args.new_tokens)
  same = np.array_equal(ours(), theirs())  # also compiles ours
  ours_prefill()
  r = args.repeats
  t = dict(ours=best_time(ours, r), theirs=best_time(theirs, r),
           ours_prefill=best_time(ours_prefill, r), theirs_prefill=best_time(theirs_prefill, r))
  steps = batch * (args.new_tokens - 1)
  ours_rate = steps / max(t["ours"] - t["ours_prefill"], 1e-9)
  theirs_rate = steps / max(t["theirs"] - t["theirs_prefill"], 1e-9)
  print(f"batch {batch} (prompt {ids.shape[1]}): prefill {t['ours_prefill'] * 1e3:7.1f} ms vs "
        f"{t['theirs_prefill'] * 1e3:7.1f} ms ({t['theirs_prefill'] / t['ours_prefill']:.2f}x); "
        f"whole generation {t['ours']:.3f} s vs {t['theirs']:.3f} s "
        f"({t['theirs'] / t['ours']:.2f}x); decode {ours_rate:8.1f} vs {theirs_rate:8.1f} "
        f"tok/s = {ours_rate / theirs_rate:.2f}x; same tokens: {same}")
  return dict(ours=ours_rate, theirs=theirs_rate)


def time_to_first_token(args):
  """Prefill time (ViT over 9216 patches, adapter, decoder over ~2330 tokens), both sides."""
  cfg = cogvlm2_1344_config()
  torch_model, model = model_pair(cfg)
  ids, types, mask, images = prompts(cfg, 1)
  _, _, ours_prefill, theirs_prefill = runners(model, torch_model, ids, types, mask, images, 1)
  ours_prefill()
  ours_s = best_time(ours_prefill, args.repeats)
  theirs_s = best_time(theirs_prefill, args.repeats)
  print(f"time to first token, CogVLM2-shaped 1344 px prompt ({ids.shape[1]} tokens; ViT "
        f"{cfg.vision.hidden_size} wide, decoder {cfg.hidden_size} x {cfg.num_hidden_layers}): "
        f"{ours_s:.3f} s vs reference {theirs_s:.3f} s ({theirs_s / ours_s:.2f}x)")


def goal(name: str, value: float, target: float) -> str:
  return f"  {name:44s} {value:6.2f}x  (goal >= {target:g}x: {'met' if value >= target else 'NOT met'})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--skip-ttft", action="store_true", help="skip the 1344 px prompt")
  args = parser.parse_args()
  print(_common.machine_line())
  cfg = bench_config(args)
  torch_model, model = model_pair(cfg)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {args.new_tokens} new tokens, best of "
        f"{args.repeats}; ours vs the reference")
  one, eight = (bench_batch(model, torch_model, cfg, b, args) for b in (1, 8))
  print("goals (decode tokens/s, prefill excluded):")
  print(goal("batch 8, ours / reference", eight["ours"] / eight["theirs"], 4))
  print(goal("batch 1, ours / reference", one["ours"] / one["theirs"], 2))
  print(goal("ours, batch 8 / batch 1", eight["ours"] / one["ours"], 5))
  print(f"  (reference, batch 8 / batch 1: {eight['theirs'] / one['theirs']:.2f}x)")
  if not args.skip_ttft:
    time_to_first_token(args)


if __name__ == "__main__":
  main()
