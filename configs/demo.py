"""The demo run: a tiny CogVLM trained from scratch on rendered shapes, in minutes on a CPU.

    python train.py --config configs/demo.py --workdir runs/demo

Data (scenes, captions, VQA, grounding boxes and a 512-piece tokenizer) is generated into
`data/demo/` on first use. Every other setting is configs/base.py's default. Override anything
on the command line, e.g. `--config.train.steps=200 --config.recipe=stage1`.
"""

import ml_collections

from cogvlm_jax.config import preset
from cogvlm_jax.data.demo import VOCAB_SIZE
from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  # A CogVLM (v1) with toy sizes: 48px images in 8px patches -> 36 image tokens (+boi/eoi).
  # At 32px (16 patches) the shapes were 8-13 px and shape questions stayed at chance; at
  # 48px a shape covers 2-3 whole patches a side (data/demo/scenes.py lays scenes out on
  # this 6x6 patch grid), and boxes are placed to a sixth.
  c.model = preset(
      "tiny-cogvlm", vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
      template_version="base", dtype="float32", param_dtype="float32",
      init_std=0.08,  # ~1/sqrt(hidden): with 0.02 (right for 4096 wide) the image is ignored
      vision=dict(image_size=48, patch_size=8, hidden_size=96, num_hidden_layers=2,
                  num_heads=4, intermediate_size=192),
  ).to_dict()
  c.data.render_size = 48  # = image_size: the PNGs are used as drawn, not resampled
  c.data.max_length = 64  # BOS + 38 image-span tokens + prompt + answer + EOS <= 63
  c.train.steps = 2000  # 80-88 ms a step measured on 2 calm cores: ~3 min of training
  return c
