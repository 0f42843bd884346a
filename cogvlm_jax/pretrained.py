"""Creating models: random init (sharded), and `from_pretrained` for checkpoints.

Models are built abstractly first (`nnx.eval_shape`, no memory), their shardings derived from
the logical axes, and only then materialised: by a jitted init whose outputs land directly
on their devices, group by group from a Hugging Face checkpoint, or by Orbax restoring each
array into its sharding from a cogvlm_jax checkpoint. No host ever holds the whole model.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cogvlm_jax import fileio
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.hf import hf_to_state
from cogvlm_jax.convert.sources import open_hf_checkpoint
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM
from cogvlm_jax.modeling.models import abstract_model, model_class  # noqa: F401
from cogvlm_jax.sharding import DEFAULT_RULES, state_shardings


def create_model(cfg: CogVLMConfig, *, mesh: Mesh | None = None, seed: int = 0,
                 rules=DEFAULT_RULES) -> CogVLMForCausalLM:
  """A randomly initialised model; with `mesh`, every parameter is created sharded."""
  cls = model_class(cfg)  # CogAgentForCausalLM for variant "cogagent"
  if mesh is None:
    return cls(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract = abstract_model(cfg, seed)
  shardings = state_shardings(abstract, mesh, rules)

  @jax.jit
  def init():
    state = nnx.state(cls(cfg, rngs=nnx.Rngs(seed)))
    return jax.lax.with_sharding_constraint(state, shardings)

  return nnx.merge(graphdef, init())


def is_hf_folder(path: str) -> bool:
  config = os.path.join(path, "config.json")
  if not os.path.exists(config):
    return False
  with open(config, "rb") as f:  # a broken config.json: ValueError naming file and line
    return "vision_config" in fileio.parse_json(config, f.read())


def from_pretrained(path: str, *, dtype=None, param_dtype=None, mesh: Mesh | None = None,
                    rules=DEFAULT_RULES, **runtime) -> CogVLMForCausalLM:
  """Loads a model from a Hugging Face folder or a cogvlm_jax checkpoint.

  Args:
    path: one of
      * a Hugging Face CogVLM/CogVLM2 folder: `config.json` + `*.safetensors` or PyTorch
        `*.bin` (each single, or sharded with an index);
      * a cogvlm_jax weights checkpoint (`python -m cogvlm_jax.convert to-jax` output);
      * a training run: its workdir (latest step) or `WORKDIR/checkpoints/<step>`.
    dtype: compute dtype (e.g. jnp.bfloat16); default float32.
    param_dtype: dtype the weights are kept in; default: as stored (bf16 stays bf16).
    mesh: place each parameter with its sharding as it is read.
    runtime: other config fields (attention_backend, remat_policy, scan_layers).
  """
  from cogvlm_jax import checkpoint

  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint folder {path} does not exist")
  if dtype is not None:
    runtime["dtype"] = jnp.dtype(dtype).name
  if param_dtype is not None:
    runtime["param_dtype"] = jnp.dtype(param_dtype).name
  if not is_hf_folder(path):
    if not checkpoint.is_jax_checkpoint(path):
      raise ValueError(f"{path} is neither a Hugging Face CogVLM folder (config.json with "
                       "vision_config) nor a cogvlm_jax checkpoint (params/ + config/ items, "
                       "or a training workdir)")
    cfg = checkpoint.read_model_config(path)
    stored = checkpoint.params_metadata(path).get(("embed_tokens",))
    if stored is not None:  # a missing embedding is reported by load_params
      runtime.setdefault("param_dtype", stored[1].name)
    cfg = cfg.replace(**runtime)
    params = checkpoint.load_params(path, cfg, mesh=mesh, rules=rules, dtype=param_dtype)
    graphdef, abstract = abstract_model(cfg)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)
  checkpoint_source = open_hf_checkpoint(path)
  try:
    # Keep weights in the dtype they are stored in unless asked (bf16 stays bf16).
    if "model.embed_tokens.weight" in checkpoint_source:  # else hf_to_state reports it
      stored = np.dtype(checkpoint_source.dtype("model.embed_tokens.weight")).name
      runtime.setdefault("param_dtype", stored)
    cfg = CogVLMConfig.from_hf_json(path, **runtime)
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None
    state = hf_to_state(cfg, checkpoint_source, abstract, shardings, dtype=cfg.param_dtype)
  finally:
    checkpoint_source.close()
  return nnx.merge(graphdef, state)
