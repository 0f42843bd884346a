"""Demo data: rendered scenes of coloured shapes with captions, VQA and referring expressions.

Deterministic (seeded numpy + PIL), generated on first use into a folder and reused after:

    scenes.py     scene sampling, rendering, and a scene's texts and records
    tokenizer.py  the demo's sentencepiece tokenizer and the corpus it is trained on
    storage.py    the folder (meta.json, jsonl splits, PNGs, LAION-style shards), load_records
    source.py     DemoSource, the Grain source the training pipeline reads

Grounding answers are written by `cogvlm_jax.boxes.format_box`, the project's one box format.
"""

from cogvlm_jax.data.demo.scenes import (COLORS, SHAPES, TASKS, TEMPLATES, Scene, Shape,
                                         caption, render_scene, sample_scene, scene_records)
from cogvlm_jax.data.demo.source import DemoSource
from cogvlm_jax.data.demo.storage import (GENERATOR_VERSION, META_FILE, SAMPLES_PER_SHARD,
                                          SHARD_DIR, SPLITS, DemoSpec, check_folder,
                                          ensure_demo_data, load_records, write_shards)
from cogvlm_jax.data.demo.tokenizer import (TOKENIZER_FILE, VOCAB_SIZE, tokenizer_corpus,
                                            train_tokenizer)

__all__ = [
    "COLORS", "SHAPES", "TASKS", "TEMPLATES", "Scene", "Shape", "caption", "render_scene",
    "sample_scene", "scene_records", "DemoSource", "GENERATOR_VERSION", "META_FILE",
    "SAMPLES_PER_SHARD", "SHARD_DIR", "SPLITS", "DemoSpec", "check_folder",
    "ensure_demo_data", "load_records", "write_shards", "TOKENIZER_FILE", "VOCAB_SIZE",
    "tokenizer_corpus", "train_tokenizer",
]
