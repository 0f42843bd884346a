"""train.py on general data: a config-driven mixture of LAION-style caption shards, grounding
shards, LLaVA and RefCOCO, with bad samples counted in the logs, worker processes and exact
resume. CPU, the toy model and demo data of test_train_demo."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.data import demo
from cogvlm_jax.data.mixture import (TfdsCaptionRecord, build_mixture,
                                     grounding_record)
from cogvlm_jax.data.pipeline import mixture_dataset
from cogvlm_jax.boxes import parse_boxes
from cogvlm_jax.data.bad_samples import BadDataError, BadSampleCounter, bad_reason_counts
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.training import loop
from cogvlm_jax import checkpoint
from cogvlm_jax.training import input_pipeline
from cogvlm_jax import metric_writers
from cogvlm_jax.training import run_config
from tests.helpers import tiny_config, write_tar


def _png(size=(24, 16), color=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def sources(data_dir, tmp_path_factory):
  """Every format, from the demo images: {name: path}."""
  root = tmp_path_factory.mktemp("mixture")
  shards = demo.write_shards(data_dir, "train", str(root / "laion"), samples_per_shard=16)
  os.makedirs(root / "broken")
  write_tar(root / "broken" / "00000.tar", [
      ("a.png", _png()), ("a.txt", b"a red square"),
      ("b.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ("b.txt", b"corrupt"),
      ("c.png", _png()),  # no caption
  ])
  records = demo.load_records(data_dir, "train")
  llava = [{"id": r["id"], "image": r["image"],
            "conversations": [{"from": "human", "value": "<image>\n" + r["query"]},
                              {"from": "gpt", "value": r["answer"]}]}
           for r in records if r["task"] == "vqa"][:20]
  (root / "llava.json").write_text(json.dumps(llava))
  refs = []
  for r in records:
    if r["task"] == "grounding":
      x0, y0, x1, y1 = (v * 64 for v in parse_boxes(r["answer"])[0])
      refs.append({"image": r["image"], "sentences": [r["query"][len("Where is "):-1]],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "width": 64, "height": 64,
                   "split": "train", "ref_id": r["id"]})
  (root / "refs.json").write_text(json.dumps(refs[:20]))
  return dict(laion=os.path.dirname(shards[0]), broken=str(root / "broken"),
              llava=str(root / "llava.json"), refs=str(root / "refs.json"),
              images=data_dir)


def mixture_config(data_dir, sources, **train):
  c = tiny_config(data_dir, **train)
  c.data.source = "mixture"
  c.data.tokenizer = data_dir
  c.data.mixture = {
      "caption": dict(kind="webdataset", paths=sources["laion"], weight=3.0,
                      filters=dict(min_image_size=32, max_aspect_ratio=6.0)),
      "grounding": dict(kind="webdataset", paths=sources["laion"] + "/*.tar",
                        task="grounding", weight=1.0),
      "broken": dict(kind="webdataset", paths=sources["broken"], weight=1.0),
      "llava": dict(kind="llava", json=sources["llava"], images=sources["images"],
                    weight=1.0),
      "refcoco": dict(kind="refcoco", json=sources["refs"], images=sources["images"],
                      split="train", weight=1.0),
  }
  c.data.max_bad_ratio = 0.5
  c.data.bad_min_samples = 8
  return c


@pytest.mark.slow
def test_mixture_run_counts_bad_samples(data_dir, sources, tmp_path):
  config = mixture_config(data_dir, sources, steps=6, log_every=3)
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result["eval"] is None  # no demo held-out split: eval.py evaluates such runs
  losses = [result["losses"][s] for s in sorted(result["losses"])]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  lines = [json.loads(l) for l in open(tmp_path / metric_writers.METRICS_FILE)]
  last = lines[-1]
  assert last["step"] == 6 and last["data/samples"] == 6 * 8
  # The broken shard is 1/7 of the mix: its corrupt image and missing caption are counted.
  assert last["data/bad_samples"] > 0
  assert last["data/bad_samples"] == sum(v for k, v in last.items()
                                         if k.startswith("data/bad/"))
  assert set(k for k in last if k.startswith("data/bad/")) <= {
      "data/bad/image_corrupt", "data/bad/caption_missing"}
  assert result["data"] == {k: v for k, v in last.items() if k.startswith("data/")}
  # Resuming with another mixture would not continue the same data stream: refused; a
  # source that moved (same data, another location) is fine.
  config.train.steps = 7
  config.data.mixture.llava.weight = 2.0
  with pytest.raises(run_config.ConfigError, match=r"data\.mixture .*use a new --workdir"):
    loop.train_and_evaluate(config, str(tmp_path))
  config.data.mixture.llava.weight = 1.0
  moved = str(tmp_path / "moved.json")
  shutil.copy(sources["llava"], moved)
  config.data.mixture.llava.json = moved
  assert sorted(loop.train_and_evaluate(config, str(tmp_path))["losses"]) == [7]


@pytest.mark.slow
def test_mixture_resume_with_worker_processes(data_dir, sources, tmp_path):
  # log_every > checkpoint_every: the counts saved at step 2 are not logged yet.
  config = mixture_config(data_dir, sources, steps=4, log_every=4, checkpoint_every=2)
  config.data.num_workers = 2
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = tmp_path / "resumed"
  first = loop.train_and_evaluate(config, str(workdir), stop_after_steps=3)
  shutil.rmtree(workdir / checkpoint.CHECKPOINTS_DIR / "3")  # killed before step 3's checkpoint
  second = loop.train_and_evaluate(config, str(workdir))
  assert first["losses"] == {s: straight["losses"][s] for s in (1, 2, 3)}
  assert second["losses"] == {s: straight["losses"][s] for s in (3, 4)}
  # The bad-sample totals continue from the checkpoint: the same as the straight run's.
  assert second["data"] == straight["data"]


def test_too_many_bad_samples_stop_the_run(data_dir, sources, tmp_path):
  config = mixture_config(data_dir, sources, steps=4)
  config.data.mixture = {"broken": dict(kind="webdataset", paths=sources["broken"])}
  with pytest.raises(BadDataError, match=r"broken/00000.tar"):
    loop.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(kind="parquet"), "kind must be one of"),
    (dict(kind="webdataset", path="x"), r"unknown field\(s\) \['path'\]"),
    (dict(kind="llava", json="x.json"), r"needs \['images'\]"),
    (dict(kind="webdataset", paths="/nonexistent/*.tar"), "no file matches"),
    (dict(kind="webdataset", paths="/tmp", task="vqa"), "task 'vqa' is not supported"),
    (dict(kind="webdataset", paths="/tmp", weight=-1), "weight must be a number >= 0"),
])
def test_bad_mixture_settings_are_named(data_dir, sources, tmp_path, change,
                                        message):
  config = mixture_config(data_dir, sources)
  config.data.mixture = {"mine": change}
  with pytest.raises(run_config.ConfigError, match=r"data\.mixture\.mine.*" + message):
    loop.train_and_evaluate(config, str(tmp_path))


def test_grounding_records_from_shard_json():
  base = {"source": "s.tar", "key": "k1", "image_bytes": b"x", "error": None}
  # CogVLM-style refs: two boxes of one expression are joined by ";".
  rec = grounding_record(dict(base, caption="c", metadata={"refs": [
      {"expression": "the dog", "box": [0.1, 0.2, 0.3, 0.4]},
      {"expression": "the dog", "box": [0.5, 0.5, 1.2, 0.9]}]}))
  assert rec["sentence"] == "the dog"
  assert rec["box_text"] == "[[100,200,300,400;500,500,999,900]]"  # clipped to the image
  # GRIT-style ref_exps: spans of the caption; the choice is stable per key.
  caption = "a man riding a horse"
  meta = {"ref_exps": [[0, 5, 0.0, 0.0, 0.5, 0.5, 0.9], [13, 20, 0.5, 0.5, 1.0, 1.0, 0.8]]}
  picks = {grounding_record(dict(base, key=f"k{i}", caption=caption, metadata=meta))["sentence"]
           for i in range(20)}
  assert picks == {"a man", "a horse"}
  once = grounding_record(dict(base, key="k7", caption=caption, metadata=meta))
  assert once == grounding_record(dict(base, key="k7", caption=caption, metadata=meta))
  # Nothing usable: a counted bad sample (box_invalid), not a crash.
  for meta in (None, {"refs": []}, {"refs": [{"expression": "x", "box": [0.5, 0.5, 0.4, 0.9]}]},
               {"refs": [{"expression": "x", "box": "0.1,0.2,0.3,0.4"}]},
               {"refs": [{"expression": "x", "box": [0.1, 0.2, 0.3]}]},
               {"refs": [{"expression": "x", "box": 0.5}]},
               {"ref_exps": [[float("nan"), 3, 0.1, 0.1, 0.2, 0.2, 1.0]]},
               {"ref_exps": [[0, 3, None, 0.1, 0.2, 0.2, 1.0]]},
               {"refs": "not a list"}):
    rec = grounding_record(dict(base, caption="c", metadata=meta))
    assert rec["box_text"] is None and rec["error"], meta
  rec = grounding_record(dict(base, caption=7, metadata={"ref_exps": [[0, 1, 0, 0, 1, 1, 1]]}))
  assert rec["box_text"] is None and rec["error"]


def test_tfds_style_decoded_images(data_dir):
  config = tiny_config(data_dir)
  _run = run_config.resolve_config(config)
  model_cfg, _ = _run.model_config, _run.mesh
  _, tok = input_pipeline.prepare_data(config, model_cfg)
  builder = ExampleBuilder(tok, model_cfg, 40)
  adapt = TfdsCaptionRecord("coco_captions")
  rgb = np.full((20, 30, 3), 200, np.uint8)
  records = [
      {"image": rgb, "captions": {"text": [b"a red circle", b"other"]}, "image/id": 1},
      {"image": rgb[..., :1], "captions": {"text": ["a gray one"]}},
      {"image": np.zeros((20, 30, 4), np.uint8), "captions": {"text": ["transparent"]}},
      {"image": rgb.astype(np.float32), "captions": {"text": ["wrong dtype"]}},
      {"captions": {"text": ["no image"]}},
  ]
  out = [builder(adapt(r)) for r in records]
  assert [bool(o["bad_sample"]) for o in out] == [False, False, False, True, True]
  assert out[0]["images"].shape == (16, 16, 3) and (out[0]["images"] == 200).all()
  assert (out[2]["images"] == 255).all()  # alpha composited on white, as for files
  ids = tok.encode("a red circle")
  assert list(out[0]["input_ids"][out[0]["loss_mask"] == 1][:len(ids)]) == ids
  assert bad_reason_counts({"bad_reason": np.stack([o["bad_reason"] for o in out])}) == {
      "image_corrupt": 1, "record_error": 1}


def test_worker_processes_resume_exactly_and_report_bad_data(data_dir, sources):
  config = mixture_config(data_dir, sources)
  _run = run_config.resolve_config(config)
  model_cfg, _ = _run.model_config, _run.mesh
  _, tok = input_pipeline.prepare_data(config, model_cfg)
  srcs, weights = build_mixture({k: dict(v) for k, v in config.data.mixture.items()})

  def make(workers):
    return iter(mixture_dataset(srcs, ExampleBuilder(tok, model_cfg, 40), batch_size=4,
                                seed=1, weights=weights, num_threads=2, process_index=0,
                                process_count=1, num_workers=workers))

  it = make(2)
  full = [next(it) for _ in range(8)]
  it.close()
  it = make(2)
  [next(it) for _ in range(3)]
  state = it.get_state()
  json.dumps(state)  # what grain.checkpoint writes
  it.close()
  resumed = make(2)
  resumed.set_state(state)
  for want in full[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  resumed.close()
  # Workers build the same examples as threads (the split of the stream differs).
  threads = make(0)
  rows = lambda batches: sorted(b["input_ids"][i].tobytes() for b in batches  # noqa: E731
                                for i in range(4))
  assert len(set(rows(full)) & set(rows([next(threads) for _ in range(8)]))) > 8
  threads.close()
  # Too many bad samples in a worker: the main process gets the BadDataError, shard named.
  broken, _ = build_mixture({"broken": dict(kind="webdataset", paths=sources["broken"])})
  builder = ExampleBuilder(tok, model_cfg, 40, counter=BadSampleCounter(0.1, min_samples=2))
  it = iter(mixture_dataset(broken, builder, batch_size=2, seed=0, process_index=0,
                            process_count=1, num_workers=2))
  with pytest.raises(BadDataError, match="broken/00000.tar"):
    [next(it) for _ in range(4)]
  it.close()
