"""Which model a config builds, and that model's abstract form.

CogAgent's model subclasses CogVLM's, so the choice between them sits above both files (a
CogVLM file that named CogAgent would import in a circle).
"""

from __future__ import annotations

from flax import nnx

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.modeling.cogagent import CogAgentForCausalLM
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM


def model_class(cfg: CogVLMConfig) -> type[CogVLMForCausalLM]:
  """The model class of a config: CogAgentForCausalLM for 'cogagent', else CogVLMForCausalLM."""
  return CogAgentForCausalLM if cfg.is_cogagent else CogVLMForCausalLM


def abstract_model(cfg: CogVLMConfig, seed: int = 0):
  """(graphdef, abstract state) of a model: shapes and logical axes, no arrays."""
  model = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(seed)))
  return nnx.split(model)
