"""cogvlm_jax: CogVLM, CogVLM2 and CogAgent in JAX/Flax NNX, exact to the PyTorch original.

    model = cogvlm_jax.from_pretrained("path/to/cogvlm-chat-hf", dtype=jnp.bfloat16)
    inputs = cogvlm_jax.build_conversation_input_ids(tokenizer, model.config, query=..., image=img)
    logits = model(input_ids, token_type_ids, images=images)       # [batch, seq, vocab] float32
    tokens = cogvlm_jax.generate(model, input_ids, token_type_ids, attention_mask, images,
                                 max_new_tokens=64)
"""

from cogvlm_jax.config import CogVLMConfig, CrossVisionConfig, VisionConfig, preset
from cogvlm_jax.generate import generate
from cogvlm_jax.image_processing import preprocess_image
from cogvlm_jax.modeling.cogagent import CogAgentForCausalLM
from cogvlm_jax.modeling.cogvlm import CogVLMForCausalLM, build_position_ids
from cogvlm_jax.pretrained import create_model, from_pretrained
from cogvlm_jax.sharding import make_mesh
from cogvlm_jax.tokenization import build_conversation_input_ids, collate, load_tokenizer

__all__ = [
    "CogVLMConfig", "VisionConfig", "CrossVisionConfig", "preset", "generate",
    "preprocess_image", "CogVLMForCausalLM", "CogAgentForCausalLM", "build_position_ids", "create_model", "from_pretrained", "make_mesh",
    "build_conversation_input_ids", "collate", "load_tokenizer",
]
