"""CogAgent-18B on GUI screenshots: grounding, grounded OCR and GUI instructions at 1120 px.

Recipe "cogagent" (CogAgent paper, arXiv 2312.08914): the Vicuna-7B language model, the
224 px EVA2-CLIP-E ViT and its adapter are frozen (bf16, no optimizer state); the
high-resolution cross module (the 1120 px EVA2-CLIP-L tower and every layer's
cross-attention) and the visual experts train. The data mixture:

* ``gui``: screenshots with element boxes (`cogvlm_jax.data.sources.gui`: LLaVA-style JSON,
  pixel [x0, y0, x1, y1] boxes, `<box:N>` in conversation text), task "both" (each element's
  grounding turn and its grounded-OCR turn) for entries without conversations;
* ``instructions``: LLaVA instruction JSON (e.g. GUI agent episodes already in box text).

lr 1e-5, batch 1024, 5000 steps, 2048 tokens: our choices for a fine-tune from a released
checkpoint, not the paper's pre-training schedule. Set the data paths (unset ones are
refused before anything is compiled) and the starting weights:

    python train.py --config configs/cogagent_gui_sft.py --workdir runs/gui \\
        --config.train.init_from=/path/to/cogagent-chat-hf \\
        --config.data.mixture.gui.json=/data/gui/train.json \\
        --config.data.mixture.gui.images=/data/gui/screenshots \\
        --config.data.mixture.instructions.json=/data/gui/episodes.json \\
        --config.data.mixture.instructions.images=/data/gui/screenshots
    python eval.py --config configs/eval/gui.py --config.checkpoint=runs/gui \\
        --config.data.annotations=/data/gui/test.json --config.data.image_root=/data/gui/...
"""

from configs._recipes import instruction_data, recipe_config


def gui_data(weight: float = 1.0, task: str = "both") -> dict:
  """GUI screenshots with element boxes (`sources.GuiSource`): set `json` and `images`."""
  return dict(kind="gui", json="", images="", task=task, weight=weight)


def get_config():
  return recipe_config(preset_name="cogagent-chat-18b", recipe="cogagent", image_size=None,
                       mixture={"gui": gui_data(), "instructions": instruction_data(0.5)},
                       max_length=2048,  # BOS + 258 image tokens + the conversation
                       lr=1e-5, batch_size=1024, steps=5000, warmup_steps=100,
                       # 1024 rows on fsdp=64: 16 per device, 16 microbatches of one row
                       grad_accum_steps=16)
