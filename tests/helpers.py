"""Helpers shared by several test modules (plain functions and constants; fixtures live in
conftest.py). Test modules import from here, never from each other.

torch and the PyTorch reference are imported inside the functions that need them, so the
subprocesses that only build a training config (`tiny_config`) do not load torch.
"""

import io
import json
import os
import random
import tarfile

import numpy as np

# ---- the Flax model against the PyTorch reference (test_parity and friends) -------------------

TOL = 1e-4  # max |difference| allowed between the fp32 Flax model and the reference


def reference_pair(name, seed=0, **overrides):
  """The seeded PyTorch reference of preset `name` and the Flax model holding its weights."""
  import torch
  from flax import nnx

  from cogvlm_jax.config import preset
  from cogvlm_jax.convert.hf import hf_to_state
  from cogvlm_jax.pretrained import abstract_model
  from tests.reference import modeling_cogvlm_ref as ref

  cfg = preset(name, **overrides)
  torch.manual_seed(seed)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_(torch_model, seed)
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  graphdef, abstract = abstract_model(cfg)
  model = nnx.merge(graphdef, hf_to_state(cfg, tensors, abstract))
  return cfg, torch_model, model


def prompt_batch(cfg, rng, batch=2, text_len=7, image_rows=None, left_pad=()):
  """Prompts [BOS, span, text]; rows in `left_pad` get that many pads on the left."""
  span = cfg.image_span_length
  image_rows = list(range(batch)) if image_rows is None else image_rows
  rows = []
  for b in range(batch):
    has = b in image_rows
    ids = [cfg.bos_token_id] + [cfg.image_placeholder_id] * (span if has else 0)
    ids += list(rng.integers(3, 100, size=text_len + (0 if has else span)))
    types = [0] + [1] * (span if has else 0) + [0] * (len(ids) - 1 - (span if has else 0))
    rows.append((ids, types))
  pads = [dict(left_pad).get(b, 0) for b in range(batch)]
  length = max(len(r[0]) + p for r, p in zip(rows, pads))
  input_ids = np.zeros((batch, length), np.int64)
  token_types = np.zeros((batch, length), np.int64)
  attention = np.zeros((batch, length), np.int64)
  for b, ((ids, types), p) in enumerate(zip(rows, pads)):
    start = length - len(ids)
    input_ids[b, start:] = ids
    token_types[b, start:] = types
    attention[b, start:] = 1
  size = cfg.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  return input_ids, token_types, attention, images, image_rows


def torch_logits(torch_model, input_ids, token_types, attention, images, image_rows):
  """The reference's logits and hidden states (numpy) for a `prompt_batch`."""
  import torch

  torch_images = torch.from_numpy(images[image_rows].transpose(0, 3, 1, 2)) if image_rows else None
  with torch.no_grad():
    out = torch_model(torch.from_numpy(input_ids), torch.from_numpy(token_types),
                      attention_mask=torch.from_numpy(attention), images=torch_images,
                      output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def max_diff(a, b, attention):
  """Max |a - b| over the positions where `attention` is 1."""
  valid = attention.astype(bool)
  return float(np.max(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid])))


# ---- CogAgent against its PyTorch reference (test_cogagent) ----------------------------------


def cogagent_reference_pair(name="tiny-cogagent", seed=0, **overrides):
  """(config, seeded PyTorch CogAgent reference, the Flax model loaded from its state dict
  through the conversion table, that state dict as numpy)."""
  import torch
  from flax import nnx

  from cogvlm_jax.config import preset
  from cogvlm_jax.convert.hf import hf_to_state
  from cogvlm_jax.pretrained import abstract_model
  from tests.reference import modeling_cogagent_ref as ref

  cfg = preset(name, **overrides)
  torch.manual_seed(seed)
  torch_model = ref.CogAgentForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_cogagent_(torch_model, seed)
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  graphdef, abstract = abstract_model(cfg)
  model = nnx.merge(graphdef, hf_to_state(cfg, tensors, abstract))
  return cfg, torch_model, model, tensors


def cogagent_torch_forward(torch_model, batch):
  """The reference's (logits, hidden states) as numpy for a collated CogAgent `batch`
  (input_ids, token_type_ids, attention_mask, images and cross_images NHWC)."""
  import torch

  def t(key):
    return torch.from_numpy(np.asarray(batch[key]).astype(np.int64))

  def nchw(key):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(batch[key]).transpose(0, 3, 1, 2)))

  with torch.no_grad():
    out = torch_model(t("input_ids"), t("token_type_ids"), t("attention_mask"), nchw("images"),
                      nchw("cross_images"), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


# ---- Hugging Face folders (test_from_pretrained, test_convert, test_chat) ---------------------


def write_hf_folder(folder, hf_config, tensors, shards=1):
  """A Hugging Face style folder: config.json + `shards` safetensors files (+ index)."""
  from cogvlm_jax.convert.safetensors_io import write_safetensors

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f)
  names = list(tensors)
  if shards == 1:
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    write_safetensors(os.path.join(folder, file), {names[j]: tensors[names[j]] for j in chunk})
    weight_map.update({names[j]: file for j in chunk})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def seeded_reference(name, seed=0):
  """(config, seeded PyTorch reference model, its state dict as numpy) for preset `name`."""
  import torch

  import cogvlm_jax
  from tests.reference import modeling_cogvlm_ref as ref

  cfg = cogvlm_jax.preset(name)
  torch.manual_seed(seed)
  torch_model = ref.CogVLMForCausalLM(cfg.to_hf_dict()).eval()
  ref.init_random_(torch_model, seed)
  return cfg, torch_model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


# ---- tiny tokenizers (the sp_dir / hf_dir fixtures) -------------------------------------------

_WORDS = ("the a cat dog sat on mat what is in this image answer question short picture red "
          "blue green describe there two three many people car tree house").split()


def tokenizer_sentences(n=60, seed=0):
  """A small seeded English-like corpus to train the tiny test tokenizers on."""
  rng = random.Random(seed)
  out = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
         for _ in range(n)]
  return out + ["Question: What is this? Answer: A cat.", "Short answer: two dogs"]


# ---- training on the demo data (test_train_*) -------------------------------------------------

SMALL_SPEC = dict(num_train_scenes=48, num_eval_scenes=4)  # the demo split the tests generate


def tiny_demo_model():
  """The toy CogVLM of the data and training tests (demo vocabulary, 16 px images, one layer
  each), as a model ConfigDict."""
  from cogvlm_jax.config import preset
  from cogvlm_jax.data import demo

  return preset(
      "tiny-cogvlm", vocab_size=demo.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
      template_version="base",
      vision=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                  num_heads=2, intermediate_size=64)).to_dict()


def tiny_demo_cogagent():
  """tiny_demo_model() as a CogAgent: the same decoder and 16 px ViT, plus a 2-block cross
  tower at 24 px (6 x 6 = 36 cross features), as a model ConfigDict."""
  from cogvlm_jax.config import CogVLMConfig

  d = tiny_demo_model()
  d["variant"] = "cogagent"
  d["cross_vision"] = dict(layers=2, width=32, head_width=8, patch_size=4, pt_hw_seq_len=16,
                           image_size=24, compute_hidden_size=32)
  return CogVLMConfig.from_dict(d).to_dict()


def tiny_config(data_dir, **train):
  """The demo training config with tiny_demo_model(); `train` overrides train.* fields."""
  from configs.demo import get_config

  c = get_config()
  c.model = tiny_demo_model()
  c.data.dir = data_dir
  c.data.num_train_scenes = SMALL_SPEC["num_train_scenes"]
  c.data.num_eval_scenes = SMALL_SPEC["num_eval_scenes"]
  c.data.max_length = 40
  c.train.batch_size = 8
  c.train.update(dict(steps=20, log_every=5, checkpoint_every=100, async_checkpoint=True))
  c.train.update(train)
  c.optim.warmup_steps = 2
  c.optim.lr = 3e-3
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 4
  c.eval.max_examples_per_task = 4
  return c


def save_random_base(config, folder: str, seed: int = 7) -> dict:
  """Saves the weights of `config`'s model at init seed `seed` (another seed than the run's)
  as a cogvlm_jax checkpoint in `folder`, for a run to start from (`train.init_from`);
  returns them flat ({path tuple: array})."""
  import jax

  from cogvlm_jax import checkpoint
  from cogvlm_jax.training import run_config
  from cogvlm_jax.training.state import all_weights, build_setup, init_train_state

  run = run_config.resolve_config(config)
  setup = build_setup(run.model_config, "full", config.optim, 4, run.mesh)
  flat = checkpoint.flatten(jax.device_get(all_weights(init_train_state(setup, seed=seed))))
  checkpoint.save_params(folder, checkpoint.unflatten(flat), run.model_config)
  return flat

def demo_batches(config, n: int) -> list[dict]:
  """The first `n` training batches of `config` as train.py reads them (model keys only)."""
  from cogvlm_jax import batch_layout
  from cogvlm_jax.training import input_pipeline, run_config

  _run = run_config.resolve_config(config)
  model_cfg, _ = _run.model_config, _run.mesh
  folder, tok = input_pipeline.prepare_data(config, model_cfg)
  it, _, _ = input_pipeline.training_data(config, model_cfg, folder, tok)
  return [{k: v for k, v in next(it).items() if k not in batch_layout.HOST_ONLY_KEYS}
          for _ in range(n)]


# ---- webdataset shards (test_data_pipeline, test_train_mixture) -------------------------------


def write_tar(path, members):
  """A tar file of (name, bytes) members, in order, with mtime 0."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      tar.addfile(info, io.BytesIO(data))
