"""The general Grain pipeline: sources -> ExampleBuilder -> mixed, sharded, batched examples.

Tiny LAION-style shards (written from a small demo split) plus hand-made bad inputs in
tmp_path; a toy model config (16px images). CPU only, a few seconds.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.data import demo
from cogvlm_jax.data.pipeline import mixture_dataset
from cogvlm_jax.data.sources import LlavaSource, RefCocoSource, WebDatasetSource
from cogvlm_jax.data.bad_samples import BadDataError, BadSampleCounter, bad_reason_counts
from cogvlm_jax.data.examples import ExampleBuilder, render_turns
from cogvlm_jax.tokenization import build_conversation_input_ids, load_tokenizer
from tests.helpers import tiny_demo_model, write_tar

MAX_LEN = 48
KEYS = ("input_ids", "token_type_ids", "attention_mask", "loss_mask", "images", "image_valid",
        "bad_sample", "bad_reason")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  folder = demo.ensure_demo_data(str(root / "demo"),
                                 demo.DemoSpec(num_train_scenes=24, num_eval_scenes=4),
                                 verbose=False)
  shards = demo.write_shards(folder, "train", str(root / "shards"), samples_per_shard=8)
  cfg = CogVLMConfig.from_dict(tiny_demo_model())
  return dict(root=root, folder=folder, shards=shards, tok=load_tokenizer(folder), cfg=cfg)


def builder(data, **kw):
  return ExampleBuilder(data["tok"], data["cfg"], MAX_LEN, **kw)


def png_bytes(mode="RGB", size=(20, 12), color=None):
  buf = io.BytesIO()
  Image.new(mode, size, color if color is not None else (10, 200, 30, 128)[:len(mode)]
            if mode not in ("L", "CMYK") else (90 if mode == "L" else (0, 50, 50, 0))).save(
                buf, "JPEG" if mode == "CMYK" else "PNG")
  return buf.getvalue()


def take(it, n):
  return [next(it) for _ in range(n)]


def rows_of(batch):
  """One hashable value per row (its tokens and pixels)."""
  return [batch["input_ids"][i].tobytes() + batch["images"][i].tobytes()
          for i in range(len(batch["input_ids"]))]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- item 1: the pipeline --------------------------------------------------------------


def test_shards_are_laion_style(data):
  src = WebDatasetSource(data["shards"], filters={"min_similarity": 0.3})
  assert len(src) == 24 and src.stats["img2dataset"]["successes"] == 24
  r = src[0]
  assert r["error"] is None and r["caption"] and r["metadata"]["boxes"]
  for t in data["shards"]:
    base = t[:-len(".tar")]
    assert os.path.exists(base + ".parquet") and os.path.exists(base + "_stats.json")


def test_caption_example_matches_reference_builder(data):
  src = WebDatasetSource(data["shards"])
  b = builder(data)
  r = src[3]
  ex = b(r)
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
      **{k: ((MAX_LEN,), np.int32) for k in KEYS[:4]},
      "images": ((16, 16, 3), np.uint8), "image_valid": ((), np.bool_),
      "bad_sample": ((), np.bool_), "bad_reason": ((), np.int32)}
  ref = build_conversation_input_ids(data["tok"], data["cfg"], query="", image=np.zeros(
      (4, 4, 3), np.uint8), template_version="base", answer=r["caption"])
  n = len(ref["input_ids"])
  for k in KEYS[:4]:
    np.testing.assert_array_equal(ex[k][:n], ref[k], err_msg=k)
    assert not ex[k][n:].any() or k == "input_ids"
  assert ex["image_valid"] and not ex["bad_sample"]
  assert b.counter.snapshot() == {"samples": 1, "bad": 0, "bad_ratio": 0.0}


def test_refcoco_and_llava_rendering(data, tmp_path):
  img = tmp_path / "im.png"
  img.write_bytes(png_bytes())
  (tmp_path / "refs.json").write_text(json.dumps([
      {"image": "im.png", "sentences": ["the green thing"], "bbox": [2, 3, 10, 6],
       "width": 20, "height": 12, "split": "train", "ref_id": 0}]))
  ex = builder(data)(RefCocoSource(str(tmp_path / "refs.json"), str(tmp_path))[0])
  n = int(ex["attention_mask"].sum())
  answer = data["tok"].decode(ex["input_ids"][:n][ex["loss_mask"][:n] == 1])
  assert answer.replace(" ", "") == "[[100,250,600,750]]"
  assert ex["image_valid"]

  turns = [["<image>\nWhat color is it?", "green"], ["How many?", "one"]]
  conv = [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]
  (tmp_path / "llava.json").write_text(json.dumps(
      [{"id": "a", "image": "im.png", "conversations": conv}]))
  rec = LlavaSource(str(tmp_path / "llava.json"), str(tmp_path))[0]
  ex = builder(data)(rec)
  span = data["cfg"].image_span_length
  n = int(ex["attention_mask"].sum())
  ids, mask = ex["input_ids"][:n], ex["loss_mask"][:n]
  assert ex["token_type_ids"][1:1 + span].all() and not ex["token_type_ids"][1 + span:].any()
  # Loss on both answers (and the final EOS), nothing else.
  trained = [data["tok"].decode([i]) for i in ids[mask == 1]]
  assert "".join(trained).replace(" ", "") == "greenone" and ids[mask == 1][-1] == 2
  # The last turn: its prompt piece, then the answer tokens + EOS exactly as the reference
  # builder (with history) tokenizes the answer.
  ref = build_conversation_input_ids(data["tok"], data["cfg"], query="How many?",
                                     history=[("What color is it?", "green")],
                                     template_version="chat", answer="one")
  answer_ids = ref["input_ids"][ref["loss_mask"] == 1]
  tail = np.concatenate([data["tok"].encode("Question: How many? Answer:"), answer_ids])
  np.testing.assert_array_equal(ids[-len(tail):], tail)
  ids2, mask2 = render_turns(data["tok"], [("q", "a")], "chat")
  assert sum(mask2) == len(data["tok"].encode("a")) + 1


def test_determinism_mixing_and_process_slices(data, tmp_path):
  src = WebDatasetSource(data["shards"])
  recs = [dict(source="llava", key=str(i), image=None, image_bytes=None,
               turns=[("Question number?", "a blue circle")], error=None) for i in range(5)]

  def batches(seed, **kw):
    it = iter(mixture_dataset([src, recs], builder(data), batch_size=4, seed=seed,
                              weights=[3, 1], num_threads=2, process_index=0,
                              process_count=1, **kw))
    return take(it, 6)

  a, b = batches(0), batches(0)
  assert_same(a, b)
  assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, batches(1)))
  # Mixing proportions 3:1 -> a quarter of the rows are the text-only LLaVA records.
  valid = np.concatenate([x["image_valid"] for x in a])
  assert valid.sum() == 18 and (~valid).sum() == 6
  # Process slices are disjoint and cover the source.
  seen = []
  for p in range(2):
    ds = mixture_dataset([src], builder(data), batch_size=4, seed=0, process_index=p,
                         process_count=2, num_threads=1)
    rows = [e for x in take(iter(ds), 3) for e in rows_of(x)]  # 12 rows = one epoch
    assert len(set(rows)) == 12
    seen.append(set(rows))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {rows_of(
      {k: v[None] for k, v in builder(data)(src[i]).items()})[0] for i in range(len(src))}


# ---- item 2: bad inputs ----------------------------------------------------------------


def bad_shards(tmp_path):
  good = png_bytes()
  members = [("ok.png", good), ("ok.txt", b"a red circle"),
             ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ("corrupt.txt", b"x"),
             ("nocap.png", good),
             ("cmyk.jpg", png_bytes("CMYK")), ("cmyk.txt", b"a cmyk image"),
             ("gray.png", png_bytes("L")), ("gray.txt", b"a gray image"),
             ("alpha.png", png_bytes("RGBA")), ("alpha.txt", b"an alpha image"),
             ("big.png", png_bytes(size=(300, 300))), ("big.txt", b"a big image")]
  write_tar(tmp_path / "00000.tar", members)
  write_tar(tmp_path / "00001.tar", [("t0.png", good), ("t0.txt", b"fine"),
                                     ("t1.png", good * 4), ("t1.txt", b"cut")])
  data = (tmp_path / "00001.tar").read_bytes()
  cut = data.index(b"t1.png") + 512 + 100  # inside t1.png's data
  (tmp_path / "00001.tar").write_bytes(data[:cut])
  return WebDatasetSource(str(tmp_path / "*.tar"))


def test_bad_inputs_are_masked_and_counted(data, tmp_path):
  src = bad_shards(tmp_path)
  b = builder(data, max_pixels=200 * 200)
  out = {src[i]["key"]: b(src[i]) for i in range(len(src))}
  assert src.stats["truncated_members"] >= 1  # the cut member is skipped, counted
  for key in ("corrupt", "nocap", "big"):
    ex = out[key]
    assert ex["bad_sample"] and not ex["image_valid"] and not ex["loss_mask"].any()
    assert ex["attention_mask"].sum() == 1 and ex["input_ids"].shape == (MAX_LEN,)
  for key in ("ok", "cmyk", "gray", "alpha", "t0"):
    assert not out[key]["bad_sample"] and out[key]["image_valid"], key
  # alpha composited on white; gray -> equal channels
  assert (out["gray"]["images"][..., 0] == out["gray"]["images"][..., 1]).all()
  snap = b.counter.snapshot()
  assert snap["bad"] == 3 and snap["samples"] == len(src)
  assert snap["bad/image_corrupt"] == snap["bad/caption_missing"] == 1
  assert snap["bad/image_too_large"] == 1

  # A box outside the image -> counted as box_invalid.
  (tmp_path / "im.png").write_bytes(png_bytes())
  (tmp_path / "refs.json").write_text(json.dumps([
      {"image": "im.png", "sentences": ["x"], "bbox": [50, 50, 5, 5], "width": 20,
       "height": 12, "split": "train"}]))
  ex = b(RefCocoSource(str(tmp_path / "refs.json"), str(tmp_path))[0])
  assert ex["bad_sample"] and b.counter.snapshot()["bad/box_invalid"] == 1


def test_bad_ratio_stops_the_run_naming_the_shard(data, tmp_path):
  src = bad_shards(tmp_path)
  counter = BadSampleCounter(max_bad_ratio=0.1, min_samples=4)
  ds = mixture_dataset([src], builder(data, counter=counter, max_pixels=200 * 200),
                       batch_size=2, seed=0, num_threads=2, process_index=0, process_count=1)
  with pytest.raises(BadDataError, match="00000.tar"):
    take(iter(ds), 10)


def test_batch_bad_sample_sum(data, tmp_path):
  src = bad_shards(tmp_path)
  b = builder(data, max_pixels=200 * 200)
  ds = mixture_dataset([src], b, batch_size=len(src), seed=0, num_threads=2,
                       process_index=0, process_count=1)
  batch = next(iter(ds))
  assert int(batch["bad_sample"].sum()) == 3
  assert bad_reason_counts(batch) == {"image_corrupt": 1, "caption_missing": 1,
                                      "image_too_large": 1}


# ---- item 4: exact resume --------------------------------------------------------------


@pytest.mark.parametrize("mix", [False, True])
def test_iterator_state_restores_exactly(data, mix):
  src = WebDatasetSource(data["shards"])
  recs = [dict(source="l", key=str(i), image=None, image_bytes=None,
               turns=[("q?", f"answer {i}")], error=None) for i in range(7)]
  sources, weights = ([src, recs], [2, 1]) if mix else ([src], None)

  def make():
    return iter(mixture_dataset(sources, builder(data), batch_size=4, seed=5, weights=weights,
                                num_threads=2, process_index=0, process_count=1))

  full = take(make(), 12)  # crosses an epoch boundary of both sources
  it = make()
  take(it, 5)
  state = it.get_state()
  json.dumps(state)  # what grain.checkpoint writes
  resumed = make()
  resumed.set_state(state)
  assert_same(take(resumed, 7), full[5:])


# ---- item 3: demo data as LAION-style shards --------------------------------------------


def test_demo_training_records_come_from_the_shards(data):
  folder = data["folder"]
  for split in demo.SPLITS:
    assert os.path.exists(os.path.join(folder, demo.SHARD_DIR, split, "00000.tar"))
    recs = demo.load_records(folder, split)
    with open(os.path.join(folder, f"{split}.jsonl")) as f:
      jsonl = [json.loads(line) for line in f]
    assert [{k: v for k, v in r.items() if k not in ("shard", "image_offset", "image_size")}
            for r in recs] == jsonl
    assert all(r["shard"].startswith(f"{demo.SHARD_DIR}/{split}/") for r in recs)
  src = demo.DemoSource(folder, "eval")
  for i, r in enumerate(recs):  # the bytes read from the tar are the PNG file's
    with open(os.path.join(folder, r["image"]), "rb") as f:
      assert src[i]["image_bytes"] == f.read()
    assert src[i]["answer"] == r["answer"] and src[i]["error"] is None


def test_demo_folder_of_another_generator_version_is_refused(data, tmp_path):
  folder = tmp_path / "old"
  folder.mkdir()
  spec = demo.DemoSpec(num_train_scenes=24, num_eval_scenes=4)
  (folder / demo.META_FILE).write_text(json.dumps(dict(spec.meta(), generator_version=1)))
  with pytest.raises(ValueError) as e:
    demo.ensure_demo_data(str(folder), spec, verbose=False)
  message = str(e.value)
  assert "\n" not in message and "generator version 1" in message, message
  assert "delete the folder or set another data.dir" in message
  assert os.listdir(folder) == [demo.META_FILE]  # nothing generated, nothing migrated
  # The current version's folder is accepted; one without its shards is not a demo folder.
  assert demo.ensure_demo_data(data["folder"], spec, verbose=False) == data["folder"]
  (folder / demo.META_FILE).write_text(json.dumps(spec.meta()))
  with pytest.raises(FileNotFoundError, match="not a complete demo data folder"):
    demo.load_records(str(folder), "train")


def test_demo_grounding_answers_are_the_box_module_s(data):
  from cogvlm_jax.boxes import format_box

  recs = [r for r in demo.load_records(data["folder"], "train") if r["task"] == "grounding"]
  src = WebDatasetSource(data["shards"])
  boxes = [b for i in range(len(src)) for b in src[i]["metadata"]["boxes"]]
  assert len(boxes) == len(recs) == 24
  # The shard json keeps the parsed box; formatting it again gives the answer text.
  assert [format_box(b) for b in boxes] == [r["answer"] for r in recs]
  scene = demo.Scene((0, 0, 0), (demo.Shape("circle", "red", (0.1006, 0.2, 0.5994, 0.3)),))
  rec = demo.scene_records(scene, np.random.default_rng(0), "s", "x.png")[-1]
  assert rec["answer"] == "[[101,200,599,300]]"  # rounded, not truncated (100 / 599)


def test_jpeg_draft_is_close_to_the_full_decode(data):
  rng = np.random.default_rng(0)
  im = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize(
      (400, 300), Image.BILINEAR)
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=95)
  rec = {"source": "s", "key": "k", "image_bytes": buf.getvalue(), "caption": "x",
         "error": None}
  full = builder(data)(rec)["images"].astype(int)
  fast = builder(data, jpeg_draft=True)(rec)["images"].astype(int)
  assert np.abs(full - fast).mean() < 4


def test_worker_shared_memory_of_dead_runs_is_removed_and_only_that(tmp_path, monkeypatch):
  """Grain workers' /dev/shm entries carry the main PID; a later start removes those of dead
  PIDs (a main process killed with kill -9) and nothing else."""
  import subprocess
  import sys
  from multiprocessing import shared_memory

  from cogvlm_jax.data import worker_shm

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  names = [f"psm_cj{dead.pid}_0a1b", f"sem.mp-cj{dead.pid}-3", f"psm_cj{os.getpid()}_ffee",
           "psm_0a1b2c3d", "sem.mp-xyz", "other"]
  for name in names:
    (tmp_path / name).write_bytes(b"x")
  removed = worker_shm.remove_dead_runs_memory(str(tmp_path))
  assert sorted(removed) == sorted(names[:2])
  assert sorted(os.listdir(tmp_path)) == sorted(names[2:])
  # What a worker names its segments after name_worker_memory (Grain's worker_init_fn).
  monkeypatch.setattr(shared_memory, "_SHM_NAME_PREFIX", shared_memory._SHM_NAME_PREFIX)
  monkeypatch.setattr(shared_memory, "_SHM_SAFE_NAME_LENGTH",
                      shared_memory._SHM_SAFE_NAME_LENGTH)
  worker_shm.name_worker_memory(4242, 0, 2)
  shm = shared_memory.SharedMemory(create=True, size=16)
  try:
    assert shm.name.startswith("psm_cj4242_") and os.path.exists(f"/dev/shm/{shm.name}")
  finally:
    shm.close()
    shm.unlink()


def test_untagged_shared_memory_is_removed_only_when_old_and_held_by_no_process(tmp_path,
                                                                                 caplog):
  """multiprocessing's untagged psm_* / sem.mp-* entries (older versions, other Python
  programs) go at the next start only if this user's, untouched for the threshold and open
  or mapped by no live process (/proc); a temp folder stands in for /dev/shm."""
  import mmap

  from cogvlm_jax.data import worker_shm

  old = ["psm_0a1b2c3d", "sem.mp-abc123", "psm_open", "sem.mp-mapped", "other", "psm_theirs"]
  for name in old + ["psm_young"]:
    (tmp_path / name).write_bytes(b"\0" * 4096)
  for name in old:  # two hours untouched
    os.utime(tmp_path / name, (os.path.getmtime(tmp_path / name) - 7200,) * 2)
  held = open(tmp_path / "psm_open", "rb")  # open in this (live) process
  with open(tmp_path / "sem.mp-mapped", "r+b") as f:  # mapped only, as sem_open leaves it
    mapped = mmap.mmap(f.fileno(), 4096)
  expect_kept = ["other", "psm_open", "psm_theirs", "psm_young", "sem.mp-mapped"]
  if os.getuid() == 0:  # another user's entry (only root can make one here)
    os.chown(tmp_path / "psm_theirs", 12345, -1)
  else:
    expect_kept.remove("psm_theirs")
  try:
    # Without a readable /proc nothing untagged can be proven unused: nothing goes.
    assert worker_shm.remove_dead_runs_memory(str(tmp_path),
                                              proc_dir=str(tmp_path / "no_proc")) == []
    with caplog.at_level("WARNING", logger=worker_shm.__name__):
      removed = worker_shm.remove_dead_runs_memory(str(tmp_path), min_untagged_age_s=3600)
    assert sorted(removed) == sorted(set(old) - set(expect_kept))
    assert sorted(os.listdir(tmp_path)) == sorted(expect_kept)
    assert f"removed {len(removed)} shared memory entries" in caplog.text
    assert "0 named by a dead run's PID" in caplog.text
  finally:
    held.close()
    mapped.close()
  # Released by its holders, an old entry goes at the next start.
  assert sorted(worker_shm.remove_dead_runs_memory(str(tmp_path))) == ["psm_open",
                                                                       "sem.mp-mapped"]


class _CharTokenizer:
  """One token per character (render_turns needs encode and eos_token_id only)."""
  eos_token_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


@pytest.mark.parametrize("variant, template, want", [
    ("cogvlm", "chat", "Question: q Answer:|Question: q2 Answer:|a2"),
    ("cogagent", "chat", " [INST] q [/INST] | [INST] q2 [/INST] |a2"),
    ("cogagent", "chat_old", "<EOI>Question: q Answer:|Question: q2 Answer:|a2")])
def test_render_turns_with_an_empty_or_template_like_answer(variant, template, want):
  """An empty answer (or one the template's text also holds) leaves the next turn's prompt
  whole: no character of the previous prompt encoded twice."""
  tok = _CharTokenizer()
  for first in ("", ":"):
    ids, mask = render_turns(tok, [("q", first), ("q2", "a2")], template, variant)
    prompt0, prompt1, answer = want.split("|")
    assert "".join(map(chr, ids[:-1])) == prompt0 + first + prompt1 + answer
    assert ids[-1] == tok.eos_token_id and sum(mask) == len(first) + len(answer) + 1
