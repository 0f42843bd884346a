"""CogVLM-17B grounding fine-tune at 490 px (the task of THUDM/cogvlm-grounding-*-hf:
referring expression -> box, and captions with boxes), starting from stage 2.

Recipe "sft": every parameter trains, the EVA2-CLIP ViT at 0.1x the learning rate. The data
are grounding shards (GRIT-style "ref_exps" / CogVLM "refs" boxes in each sample's .json,
see `cogvlm_jax.data.mixture`), mixed with LLaVA-style instructions so that the chat
ability is kept. Rows: BOS + the 1227-token image span + an expression and its boxes
(<= 132 text tokens). lr 1e-5, batch 1024, 5000 steps, 100 warmup: our defaults, not the
paper's (it does not give them for the grounding model).

Memory: 1024 rows on fsdp=64 are 16 per chip, run as 16 microbatches of one row, as
configs/cogvlm_sft.py. On 256 chips (v5e-256, v6e-256) each chip has 4 rows:
--config.train.grad_accum_steps=4 keeps one row per microbatch (TPU compiler, v5e-256: 4.89
GiB per chip of 16; table: README, "TPU").

    python train.py --config configs/cogvlm_grounding_sft.py --workdir runs/grounding \\
        --config.train.init_from=runs/stage2 --config.data.tokenizer=/models/vicuna-7b \\
        --config.data.mixture.grounding.paths='gs://bucket/grit/*.tar' \\
        --config.data.mixture.instructions.json=/data/sft/instructions.json \\
        --config.data.mixture.instructions.images=/data/sft/images
    python -m cogvlm_jax.plan --config configs/cogvlm_grounding_sft.py --topology v5p-128
"""

from configs._recipes import grounding_shards, instruction_data, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm-base-490", recipe="sft", image_size=490,
                       mixture={"grounding": grounding_shards(0.8),
                                "instructions": instruction_data(0.2)},
                       max_length=1360, lr=1e-5, batch_size=1024, steps=5000,
                       warmup_steps=100, vit_lr_scale=0.1, grad_accum_steps=16)
