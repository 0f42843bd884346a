"""Weight conversion between Hugging Face CogVLM checkpoints and cogvlm_jax."""
