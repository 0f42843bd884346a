"""Random-access data sources: webdataset shards, filters, LLaVA, RefCOCO, TFDS, bad images.

All data is made here, tiny, in tmp_path: tar shards written like img2dataset writes them
(jpg/txt/json members, a parquet and a _stats.json beside each tar).
"""

import concurrent.futures
import io
import json
import logging
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.data.sources import (LlavaSource, MetadataFilter, RefCocoSource,
                                     WebDatasetSource, clip_box, decode_image,
                                     parse_conversation, render_box, scan_tar,
                                     strip_image_marker, tfds_source)
from cogvlm_jax import fileio

# ---- helpers ---------------------------------------------------------------------------


def _image_bytes(fmt="JPEG", size=(8, 6), color=(200, 30, 40), mode="RGB", **save):
  b = io.BytesIO()
  Image.new(mode, size, color).save(b, fmt, **save)
  return b.getvalue()


def _write_tar(path, members):
  """members: [(name, bytes)] written in order, like img2dataset's tar writer."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _sample_members(key, image=None, caption=None, meta=None, ext="jpg"):
  out = []
  if image is not None:
    out.append((f"{key}.{ext}", image))
  if caption is not None:
    out.append((f"{key}.txt", caption.encode("utf-8")))
  if meta is not None:
    out.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
  return out


def make_shard(folder, shard, samples, *, parquet=True, stats=True):
  """Writes {shard}.tar (+ .parquet + _stats.json). samples: dicts with key, image, caption,
  meta (also the parquet row). Returns {key: image bytes}."""
  members, images = [], {}
  for s in samples:
    members += _sample_members(s["key"], s.get("image"), s.get("caption"), s.get("meta"),
                               s.get("ext", "jpg"))
    if s.get("image") is not None:
      images[s["key"]] = s["image"]
  _write_tar(os.path.join(folder, f"{shard}.tar"), members)
  if parquet:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"key": s["key"], "url": f"http://x/{s['key']}", "caption": s.get("caption"),
             **(s.get("meta") or {})} for s in samples]
    columns = sorted({c for r in rows for c in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}),
                   os.path.join(folder, f"{shard}.parquet"))
  if stats:
    with open(os.path.join(folder, f"{shard}_stats.json"), "w") as f:
      json.dump({"count": len(samples), "successes": len(samples), "failed_to_download": 0,
                 "failed_to_resize": 0}, f)
  return images


def _meta(width=64, height=48, similarity=0.35, punsafe=0.01, pwatermark=0.05):
  return {"width": width, "height": height, "similarity": similarity, "punsafe": punsafe,
          "pwatermark": pwatermark}


def _basic_shards(folder):
  """Two shards: 3 + 2 images, one key without caption, one key without an image."""
  a = make_shard(folder, "00000", [
      {"key": "000000000", "image": _image_bytes(color=(1, 2, 3)), "caption": "a red cat",
       "meta": _meta()},
      {"key": "000000001", "image": _image_bytes("PNG"), "caption": "a png", "meta": _meta(),
       "ext": "png"},
      {"key": "000000002", "image": _image_bytes(color=(9, 9, 9)), "meta": _meta()},  # no txt
      {"key": "000000003", "caption": "caption without image", "meta": _meta()},
  ])
  b = make_shard(folder, "00001", [
      {"key": "000010000", "image": _image_bytes(color=(50, 60, 70)), "caption": "ünïcode",
       "meta": _meta()},
      {"key": "000010001", "image": _image_bytes("WEBP"), "caption": "a webp",
       "meta": {**_meta(), "boxes": [[0, 0, 4, 4]]}, "ext": "webp"},
  ])
  return {**a, **b}


# ---- webdataset --------------------------------------------------------------------------


def test_webdataset_index_and_read_back(tmp_path):
  images = _basic_shards(tmp_path)
  src = WebDatasetSource(str(tmp_path))
  assert len(src) == 5
  assert [src[i]["key"] for i in range(len(src))] == [
      "000000000", "000000001", "000000002", "000010000", "000010001"]
  for i in range(len(src)):
    r = src[i]
    assert r["image_bytes"] == images[r["key"]]  # exact bytes, straight from the tar
    assert r["error"] is None
    assert r["source"].endswith((".tar"))
  assert src[0]["caption"] == "a red cat" and src[0]["image_ext"] == "jpg"
  assert src[1]["image_ext"] == "png"
  assert src[2]["caption"] is None  # no .txt: the pipeline decides
  assert src[3]["caption"] == "ünïcode"
  assert src[4]["metadata"]["boxes"] == [[0, 0, 4, 4]] and src[4]["image_ext"] == "webp"
  assert src[-1]["key"] == "000010001"
  with pytest.raises(IndexError):
    src[5]
  st = src.stats
  assert st["shards"] == 2 and st["samples"] == 5 and st["keys_without_image"] == 1
  assert st["samples_without_caption"] == 1 and st["truncated_members"] == 0
  assert st["img2dataset"] == {"count": 6, "successes": 6, "failed_to_download": 0,
                               "failed_to_resize": 0}
  # The index is cached beside each shard.
  assert os.path.exists(tmp_path / "00000.tar.idx.json")
  assert os.path.exists(tmp_path / "00001.tar.idx.json")


def test_webdataset_paths_glob_and_list(tmp_path):
  _basic_shards(tmp_path)
  by_glob = WebDatasetSource(str(tmp_path / "0000*.tar"))
  assert by_glob.shards == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
  one = WebDatasetSource([str(tmp_path / "00001.tar")])
  assert len(one) == 2 and one[0]["key"] == "000010000"
  with pytest.raises(FileNotFoundError, match="no file matches"):
    WebDatasetSource(str(tmp_path / "nope*.tar"))
  with pytest.raises(FileNotFoundError):
    WebDatasetSource(str(tmp_path / "missing.tar"))


def test_webdataset_host_sharding_by_file(tmp_path):
  for i in range(5):
    make_shard(tmp_path, f"{i:05d}", [{"key": f"{i}", "image": _image_bytes()}], parquet=False)
  hosts = [WebDatasetSource(str(tmp_path), shard_index=h, shard_count=2) for h in range(2)]
  assert [[s[i]["key"] for i in range(len(s))] for s in hosts] == [["0", "2", "4"], ["1", "3"]]
  with pytest.raises(ValueError, match="shard_index"):
    WebDatasetSource(str(tmp_path), shard_index=2, shard_count=2)


def test_webdataset_compressed_tar_is_a_clear_error(tmp_path):
  with tarfile.open(tmp_path / "x.tar", "w:gz") as tar:
    info = tarfile.TarInfo("a.jpg")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  with pytest.raises(ValueError, match="uncompressed tar"):
    WebDatasetSource(str(tmp_path / "x.tar"))


def test_index_cache_reused_and_rebuilt_when_tar_changes(tmp_path):
  _basic_shards(tmp_path)
  first = WebDatasetSource(str(tmp_path))
  assert (first.stats["index_built"], first.stats["index_reused"]) == (2, 0)
  second = WebDatasetSource(str(tmp_path))
  assert (second.stats["index_built"], second.stats["index_reused"]) == (0, 2)

  # Same size, new mtime (e.g. re-copied): rebuilt.
  tar = tmp_path / "00001.tar"
  st = os.stat(tar)
  os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  third = WebDatasetSource(str(tmp_path))
  assert (third.stats["index_built"], third.stats["index_reused"]) == (1, 1)

  # New content: rebuilt, and the new bytes come back.
  new_image = _image_bytes(size=(20, 20), color=(0, 255, 0))
  make_shard(tmp_path, "00001", [{"key": "k", "image": new_image, "caption": "new"}])
  os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
  fourth = WebDatasetSource(str(tmp_path))
  assert (fourth.stats["index_built"], fourth.stats["index_reused"]) == (1, 1)
  assert len(fourth) == 4 and fourth[3]["image_bytes"] == new_image


def test_index_falls_back_to_user_cache_when_folder_read_only(tmp_path, monkeypatch, caplog):
  data = tmp_path / "data"
  data.mkdir()
  _basic_shards(data)
  cache = tmp_path / "cache"
  monkeypatch.setenv("COGVLM_JAX_CACHE_DIR", str(cache))
  real_write = fileio.write_atomic

  def read_only_data(path, payload):  # chmod does not stop root, so simulate EACCES
    if os.path.dirname(os.path.abspath(path)) == str(data):
      raise PermissionError(13, "Permission denied", path)
    real_write(path, payload)

  monkeypatch.setattr(fileio, "write_atomic", read_only_data)
  with caplog.at_level(logging.WARNING):
    src = WebDatasetSource(str(data))
  fallback = str(cache / "tar_index")
  assert src.stats["index_fallback_dirs"] == [fallback]
  assert sorted(os.listdir(fallback)) and not list(data.glob("*.idx.json"))
  assert fallback in caplog.text  # the log says where the indexes went
  again = WebDatasetSource(str(data))
  assert again.stats["index_reused"] == 2
  assert again[0]["image_bytes"] == src[0]["image_bytes"]


def test_truncated_tar_indexes_complete_members(tmp_path):
  images = make_shard(tmp_path, "00000", [
      {"key": f"{i:09d}", "image": _image_bytes(size=(40, 40), color=(i, 0, 0)),
       "caption": f"c{i}"} for i in range(3)], parquet=False)
  path = tmp_path / "00000.tar"
  full = scan_tar(str(path))
  last_image = [m for m in full.members if m[:2] == ("000000002", "jpg")][0]
  # Cut the file in the middle of the last image's data.
  with open(path, "r+b") as f:
    f.truncate(last_image[2] + last_image[3] // 2)
  index = scan_tar(str(path))
  assert index.truncated == 1
  assert [(k, e) for k, e, _, _ in index.members] == [
      ("000000000", "jpg"), ("000000000", "txt"), ("000000001", "jpg"), ("000000001", "txt")]
  src = WebDatasetSource(str(path))
  assert len(src) == 2 and src.stats["truncated_members"] == 1
  assert src[1]["image_bytes"] == images["000000001"]

  # Cut inside a header (after the complete first sample).
  make_shard(tmp_path, "00001", [
      {"key": f"{i:09d}", "image": _image_bytes(), "caption": "c"} for i in range(2)],
             parquet=False)
  path = tmp_path / "00001.tar"
  second_header = scan_tar(str(path)).members[2][2] - 512
  with open(path, "r+b") as f:
    f.truncate(second_header + 100)
  index = scan_tar(str(path))
  assert index.truncated == 1 and len(index.members) == 2


def test_webdataset_threads_and_pickle(tmp_path):
  images = _basic_shards(tmp_path)
  src = WebDatasetSource(str(tmp_path), max_open_files=1)  # forces handle eviction
  want = [images[src[i]["key"]] for i in range(len(src))]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(lambda i: src[i % len(src)]["image_bytes"], range(200)))
  assert got == [want[i % len(src)] for i in range(200)]
  clone = pickle.loads(pickle.dumps(src))  # after reads: open handles must not travel
  assert len(clone) == len(src) and clone.stats == src.stats
  assert [clone[i]["image_bytes"] for i in range(len(clone))] == want


def _read_all_image_bytes(src):
  return [src[i]["image_bytes"] for i in range(len(src))]


def test_webdataset_in_a_worker_process(tmp_path):
  """The source goes to a fresh (spawned) process by pickle and opens its own files there."""
  import multiprocessing
  _basic_shards(tmp_path)
  src = WebDatasetSource(str(tmp_path))
  want = _read_all_image_bytes(src)
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    assert pool.submit(_read_all_image_bytes, src).result(timeout=120) == want


def test_remote_paths_need_a_backend():
  try:
    import gcsfs  # noqa: F401
    pytest.skip("gcsfs is installed: gs:// would really be tried")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="gcsfs"):
    WebDatasetSource("gs://some-bucket/laion/*.tar")


# ---- filters -------------------------------------------------------------------------------


_FILTERS = {"min_image_size": 32, "max_aspect_ratio": 6, "min_similarity": 0.28,
            "max_punsafe": 0.5, "max_pwatermark": 0.8}


def _filter_samples():
  """(samples, the reason each one fails or None): one per reason, in filter order."""
  cases = [
      (_meta(), None),
      (_meta(width=20, height=100), "min_image_size"),  # also too tall: first reason counts
      (_meta(width=700, height=100), "max_aspect_ratio"),
      (_meta(width=100, height=601), None),  # 6.01 > 6 ...
      (_meta(width=100, height=600), None),  # ... 6.0 is still in
      (_meta(similarity=0.1), "min_similarity"),
      (_meta(punsafe=0.9), "max_punsafe"),
      (_meta(pwatermark=0.95), "max_pwatermark"),
      ({**_meta(), "similarity": None}, None),  # null passes
  ]
  cases[3] = (cases[3][0], "max_aspect_ratio")
  samples = [{"key": f"{i:09d}", "image": _image_bytes(), "caption": f"c{i}", "meta": m}
             for i, (m, _) in enumerate(cases)]
  return samples, [why for _, why in cases]


@pytest.mark.parametrize("with_parquet", [True, False])
def test_filters_count_by_reason(tmp_path, with_parquet):
  samples, reasons = _filter_samples()
  make_shard(tmp_path, "00000", samples, parquet=with_parquet)
  src = WebDatasetSource(str(tmp_path), filters=_FILTERS)
  kept = [s["key"] for s, why in zip(samples, reasons) if why is None]
  assert [src[i]["key"] for i in range(len(src))] == kept
  expected = {name: reasons.count(name) for name in _FILTERS}
  assert src.stats["filtered"] == expected
  assert src.stats["filtered_total"] == len(samples) - len(kept)
  assert src.stats["samples_before_filtering"] == len(samples)
  assert src.stats["samples_without_metadata"] == 0


def test_filters_prefer_original_size_and_match_case(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  make_shard(tmp_path, "00000", [
      {"key": "a", "image": _image_bytes()}, {"key": "b", "image": _image_bytes()}],
             parquet=False)
  # img2dataset resized both to 256; the originals differ. LAION-style upper-case names.
  pq.write_table(pa.table({"key": ["a", "b"], "width": [256, 256], "height": [256, 256],
                           "original_width": [1024, 100], "original_height": [768, 90],
                           "PUNSAFE": [0.9, 0.0]}), tmp_path / "00000.parquet")
  src = WebDatasetSource(str(tmp_path), filters={"min_image_size": 128})
  assert [src[i]["key"] for i in range(len(src))] == ["a"]
  src = WebDatasetSource(str(tmp_path), filters={"max_punsafe": 0.5})
  assert [src[i]["key"] for i in range(len(src))] == ["b"]


def test_filters_missing_columns_are_skipped_and_logged_once(tmp_path, caplog):
  for shard in ("00000", "00001"):
    make_shard(tmp_path, shard, [
        {"key": f"{shard}{i}", "image": _image_bytes(), "meta": {"width": 10, "height": 10}}
        for i in range(2)])
  with caplog.at_level(logging.WARNING):
    src = WebDatasetSource(str(tmp_path), filters={"min_similarity": 0.3,
                                                   "min_image_size": 5})
  assert len(src) == 4 and src.stats["filtered"] == {"min_image_size": 0,
                                                     "min_similarity": 0}
  skipped = [r for r in caplog.records if "min_similarity" in r.getMessage()]
  assert len(skipped) == 1 and "skipped" in skipped[0].getMessage()


def test_filters_samples_without_metadata_pass(tmp_path):
  make_shard(tmp_path, "00000", [
      {"key": "a", "image": _image_bytes(), "meta": {"width": 10, "height": 10}},
      {"key": "b", "image": _image_bytes()}], parquet=False)
  src = WebDatasetSource(str(tmp_path), filters={"min_image_size": 32})
  assert [src[i]["key"] for i in range(len(src))] == ["b"]
  assert src.stats["samples_without_metadata"] == 1
  assert src.stats["filtered"] == {"min_image_size": 1}


def test_filter_config_errors():
  with pytest.raises(ValueError, match="unknown filter"):
    MetadataFilter.from_config({"min_imag_size": 10})
  with pytest.raises(ValueError, match="max_aspect_ratio"):
    MetadataFilter.from_config({"max_aspect_ratio": 0.5})
  f = MetadataFilter.from_config({"min_image_size": None, "max_punsafe": 0.5})
  assert f.active == {"max_punsafe": 0.5}
  assert not MetadataFilter.from_config(None)
  assert pickle.loads(pickle.dumps(f)).active == f.active


def test_filter_needs_pyarrow_message(tmp_path, monkeypatch):
  import builtins
  make_shard(tmp_path, "00000", [{"key": "a", "image": _image_bytes(), "meta": _meta()}])
  real_import = builtins.__import__

  def no_pyarrow(name, *args, **kwargs):
    if name.startswith("pyarrow"):
      raise ImportError("No module named 'pyarrow'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_pyarrow)
  with pytest.raises(ImportError, match="pyarrow"):
    WebDatasetSource(str(tmp_path), filters={"min_image_size": 10})
  assert len(WebDatasetSource(str(tmp_path))) == 1  # no filter: no parquet, no pyarrow


# ---- LLaVA ---------------------------------------------------------------------------------


def _llava_json(tmp_path, entries):
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(entries))
  return str(path)


def test_llava_multi_turn_missing_image_and_malformed(tmp_path):
  images = tmp_path / "images"
  (images / "coco").mkdir(parents=True)
  jpg = _image_bytes()
  (images / "coco" / "1.jpg").write_bytes(jpg)
  entries = [
      {"id": "1", "image": "coco/1.jpg", "conversations": [
          {"from": "human", "value": "<image>\nWhat is this?"},
          {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "Which colour?"},
          {"from": "gpt", "value": "Red."}]},
      {"id": "2", "image": "coco/missing.jpg", "conversations": [
          {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "A dog."}]},
      {"id": "3", "conversations": [  # text only
          {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
      {"id": "4", "image": "coco/1.jpg", "conversations": [  # odd: dropped
          {"from": "human", "value": "<image>\nQ"}]},
      {"id": "5", "image": "coco/1.jpg", "conversations": [  # wrong order: dropped
          {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
  ]
  src = LlavaSource(_llava_json(tmp_path, entries), str(images))
  assert len(src) == 3
  assert src.stats == {"entries": 5, "records": 3, "malformed": 2, "text_only": 1}
  r = src[0]
  assert r["key"] == "1" and r["image_bytes"] == jpg and r["error"] is None
  assert r["turns"] == [("What is this?", "A cat."), ("Which colour?", "Red.")]
  r = src[1]
  assert r["image_bytes"] is None and "not found" in r["error"]
  assert r["turns"] == [("Describe.", "A dog.")]
  r = src[2]
  assert r["image"] is None and r["image_bytes"] is None and r["error"] is None
  clone = pickle.loads(pickle.dumps(src))
  assert clone[0] == src[0] and len(clone) == 3


def test_llava_helpers():
  assert strip_image_marker("<image>\nQ") == "Q"
  assert strip_image_marker("Q\n<image>") == "Q"
  assert strip_image_marker("a <image> b") == "a  b"
  assert strip_image_marker("no marker ") == "no marker "
  turns, why = parse_conversation([{"from": "user", "value": "q"},
                                   {"from": "assistant", "value": "a"}])
  assert turns == [("q", "a")] and why is None
  assert parse_conversation([])[1] == "no conversation"


def test_llava_jsonl(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps({"id": i, "image": "x.jpg", "conversations": [
      {"from": "human", "value": "q"}, {"from": "gpt", "value": f"a{i}"}]}) for i in range(3)))
  src = LlavaSource(str(path), str(tmp_path))
  assert len(src) == 3 and src[2]["turns"] == [("q", "a2")] and src[2]["key"] == "2"


def test_bad_llava_json_names_the_file_and_the_true_line(tmp_path):
  entry = json.dumps({"id": 0, "image": "x.jpg", "conversations": []})
  lines = tmp_path / "d.jsonl"
  lines.write_text("\n".join([entry] * 5 + ['{"id": 5, "image": ', entry]) + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl: line 6 column \d+: invalid JSON"):
    LlavaSource(str(lines), str(tmp_path))
  whole = tmp_path / "d.json"
  text = json.dumps([json.loads(entry)] * 40, indent=1)
  whole.write_text(text[:len(text) // 2])  # cut short, as by a failed copy
  line = text[:len(text) // 2].count("\n") + 1
  with pytest.raises(ValueError, match=rf"d\.json: line {line} column \d+: invalid JSON: .*"
                                       r"truncated\?"):
    LlavaSource(str(whole), str(tmp_path))


# ---- RefCOCO -------------------------------------------------------------------------------


def test_render_box_format_and_clipping():
  assert render_box([0, 0, 640, 480], 640, 480) == "[[000,000,999,999]]"
  # 100/640*1000 = 156.25 -> 156; 300/640*1000 = 468.75 -> 469; 150/480*1000 = 312.5 -> 312
  # (Python's round: halves go to the even neighbour).
  assert render_box([100, 50, 200, 100], 640, 480) == "[[156,104,469,312]]"
  assert render_box([[0, 0, 64, 48], [320, 240, 320, 240]], 640, 480) == \
      "[[000,000,100,100;500,500,999,999]]"
  # Partly outside: clipped to the image.
  assert render_box([-10, -10, 74, 58], 640, 480) == "[[000,000,100,100]]"
  assert clip_box([-10, 5, 20, 10], 100, 100) == ((0.0, 5.0, 10.0, 10.0), True)
  assert clip_box([1, 2, 3, 4], 100, 100) == ((1.0, 2.0, 3.0, 4.0), False)
  assert clip_box([200, 200, 5, 5], 100, 100) == (None, False)
  assert clip_box([1, 1, 0, 5], 100, 100) == (None, False)
  with pytest.raises(ValueError, match="no area"):
    render_box([700, 0, 10, 10], 640, 480)


def test_refcoco_source(tmp_path):
  (tmp_path / "img.jpg").write_bytes(_image_bytes())
  refs = [
      {"image": "img.jpg", "sentences": ["left man", {"sent": "man on the left"}],
       "bbox": [0, 0, 320, 480], "width": 640, "height": 480, "split": "val", "ref_id": 7},
      {"image": "img.jpg", "sentences": ["edge"], "bbox": [600, 400, 100, 100],
       "width": 640, "height": 480, "split": "val", "ref_id": 8},  # partly outside
      {"image": "img.jpg", "sentences": ["nowhere"], "bbox": [700, 500, 10, 10],
       "width": 640, "height": 480, "split": "val", "ref_id": 9},  # fully outside
      {"image": "gone.jpg", "sentences": ["train one"], "bbox": [0, 0, 10, 10],
       "width": 640, "height": 480, "split": "train", "ref_id": 10},
  ]
  path = tmp_path / "refs.json"
  path.write_text(json.dumps(refs))
  src = RefCocoSource(str(path), str(tmp_path), split="val")
  assert len(src) == 4  # 2 + 1 + 1 sentences
  r = src[0]
  assert (r["key"], r["sentence"], r["box_text"]) == ("7/0", "left man", "[[000,000,500,999]]")
  assert r["image_bytes"] == (tmp_path / "img.jpg").read_bytes() and r["error"] is None
  assert src[1]["sentence"] == "man on the left"
  edge = src[2]
  assert edge["bbox"] == [600.0, 400.0, 40.0, 80.0] and edge["box_text"] == \
      "[[938,833,999,999]]"
  bad = src[3]
  assert bad["box_text"] is None and "no area" in bad["error"] and bad["image_bytes"] is None
  assert src.stats["clipped_boxes"] == 1 and src.stats["invalid_boxes"] == 1

  train = RefCocoSource(str(path), str(tmp_path), split="train", per_sentence=False)
  assert len(train) == 1 and train[0]["sentences"] == ["train one"]
  assert "not found" in train[0]["error"]
  assert len(RefCocoSource(str(path), str(tmp_path))) == 5  # all splits
  with pytest.raises(ValueError, match="no split 'testA'"):
    RefCocoSource(str(path), str(tmp_path), split="testA")
  clone = pickle.loads(pickle.dumps(src))
  assert clone[0] == src[0]


# ---- decode_image --------------------------------------------------------------------------


def _png_chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(
      ">I", zlib.crc32(kind + data) & 0xffffffff)


def _one_bit_png(width, height):
  """A valid black 1-bit PNG built row by row: a huge image stays a few hundred KB."""
  row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
  comp = zlib.compressobj(9)
  idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
  ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) +
          _png_chunk(b"IEND", b""))


LIMIT = 4_000_000


def test_decode_image_good_modes():
  im, err = decode_image(_image_bytes(color=(10, 20, 30)), max_pixels=LIMIT)
  assert err is None and im.mode == "RGB" and im.size == (8, 6)
  im, err = decode_image(_image_bytes("PNG", mode="L", color=77), max_pixels=LIMIT)
  assert err is None and im.mode == "RGB" and im.getpixel((0, 0)) == (77, 77, 77)
  cmyk = _image_bytes("JPEG", mode="CMYK", color=(0, 255, 255, 0))  # CMYK JPEG: red
  im, err = decode_image(cmyk, max_pixels=LIMIT)
  assert err is None and im.mode == "RGB"
  r, g, b = im.getpixel((0, 0))
  assert r > 200 and g < 60 and b < 60
  p = Image.new("P", (4, 4), 1)
  p.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
  buf = io.BytesIO()
  p.save(buf, "PNG")
  im, err = decode_image(buf.getvalue(), max_pixels=LIMIT)
  assert err is None and im.getpixel((0, 0)) == (0, 128, 255)
  sixteen = Image.fromarray(np.full((3, 3), 65535, np.uint16))
  buf = io.BytesIO()
  sixteen.save(buf, "PNG")
  im, err = decode_image(buf.getvalue(), max_pixels=LIMIT)
  assert err is None and im.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_alpha_white_or_drop():
  rgba = _image_bytes("PNG", mode="RGBA", color=(0, 0, 0, 0))  # fully transparent black
  im, err = decode_image(rgba, max_pixels=LIMIT)
  assert err is None and im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
  im, _ = decode_image(rgba, max_pixels=LIMIT, alpha="drop")
  assert im.getpixel((0, 0)) == (0, 0, 0)
  half = _image_bytes("PNG", mode="RGBA", color=(0, 0, 0, 128))
  im, _ = decode_image(half, max_pixels=LIMIT)
  assert 120 <= im.getpixel((0, 0))[0] <= 135
  p = Image.new("P", (2, 2), 0)
  p.putpalette([10, 10, 10] + [0] * 765)
  buf = io.BytesIO()
  p.save(buf, "PNG", transparency=0)  # P with a transparent palette entry
  im, _ = decode_image(buf.getvalue(), max_pixels=LIMIT)
  assert im.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_bad_input_never_raises():
  im, err = decode_image(b"<html>404 not found</html>", max_pixels=LIMIT)
  assert im is None and "cannot identify" in err and "<html>" in err
  im, err = decode_image(b"", max_pixels=LIMIT)
  assert im is None and err == "no image bytes"
  im, err = decode_image(None, max_pixels=LIMIT)
  assert im is None and err == "no image bytes"
  # A truncated JPEG: the header parses, the pixels do not.
  rng = np.random.default_rng(0)
  noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
  buf = io.BytesIO()
  noisy.save(buf, "JPEG", quality=95)
  im, err = decode_image(buf.getvalue()[:len(buf.getvalue()) // 2], max_pixels=LIMIT)
  assert im is None and "cannot decode" in err and "truncated" in err
  # A PNG with a valid header and damaged pixel data (the zlib stream of IDAT).
  buf = io.BytesIO()
  noisy.save(buf, "PNG")
  png = bytearray(buf.getvalue())
  idat = png.find(b"IDAT") + 4
  png[idat + 10:idat + 30] = b"\xff" * 20
  im, err = decode_image(bytes(png), max_pixels=LIMIT)
  assert im is None and "cannot decode image (PNG)" in err
  # A damaged header (the width).
  png = bytearray(buf.getvalue())
  png[16:20] = b"\xff" * 4
  im, err = decode_image(bytes(png), max_pixels=LIMIT)
  assert im is None and err


def test_decode_image_decompression_bombs():
  # 30000 x 30000 = 900 M pixels in ~100 KB: beyond PIL's own hard limit (2 x 89 M).
  bomb = _one_bit_png(30000, 30000)
  assert len(bomb) < 1_000_000
  im, err = decode_image(bomb, max_pixels=LIMIT)
  assert im is None and err.startswith("image too large")
  # Below PIL's limits but above ours: rejected from the header, nothing decoded.
  im, err = decode_image(_one_bit_png(3000, 3000), max_pixels=LIMIT)
  assert im is None and err.startswith("image too large") and "3000x3000" in err
  im, err = decode_image(_one_bit_png(1000, 1000), max_pixels=LIMIT)
  assert err is None and im.size == (1000, 1000) and im.mode == "RGB"


# ---- TFDS ----------------------------------------------------------------------------------


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds
  captions = [f"caption {i}" for i in range(5)]

  class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # Not registered: reading then goes through the files alone (as for a dataset prepared
    # elsewhere), and the source pickles without this local class.
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image_bytes": tfds.features.Scalar(dtype=np.object_),
          "caption": tfds.features.Text()}))

    # tfds 4.9.10 looks for a builder's source files with the `importlib_resources` package
    # (not among its dependencies) when the builder lives in a package, as this test does;
    # None is tfds's own answer for builders without files (e.g. defined in a notebook).
    code_path = None

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, c in enumerate(captions):
        yield i, {"image_bytes": b"img%d" % i, "caption": c}

  TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = tfds_source("tiny_captions", "train", str(tmp_path))
  assert len(src) == 5
  got = sorted(src[i]["caption"].decode() for i in range(len(src)))
  assert got == captions
  clone = pickle.loads(pickle.dumps(src))
  assert clone[0]["caption"] == src[0]["caption"]
  with pytest.raises(Exception):  # not prepared in data_dir, and no download by default
    tfds_source("tiny_captions_missing", "train", str(tmp_path / "empty"))


def test_tfds_source_without_package(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name.startswith("tensorflow_datasets"):
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(ImportError, match="tensorflow-datasets"):
    tfds_source("mnist", "train")


def test_an_unreadable_shard_is_a_counted_bad_source_under_the_ratio_rule(tmp_path, capsys):
  from cogvlm_jax.data.bad_samples import BadDataError
  from cogvlm_jax.data.mixture import build_mixture

  _basic_shards(str(tmp_path))  # two good shards, 4 samples with an image
  (tmp_path / "00002.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)  # gzip, not a plain tar
  spec = {"laion": dict(kind="webdataset", paths=str(tmp_path / "*.tar"))}
  sources, _ = build_mixture(spec, max_bad_ratio=0.5)  # 1 of 3 files: within the ratio
  src = sources[0].source
  assert src.stats["unreadable_shards"] == 1 and list(src.unreadable) == [
      str(tmp_path / "00002.tar")]
  assert len(src) == 5 and all(r["source"] != str(tmp_path / "00002.tar")
                               for r in (src[i] for i in range(len(src))))
  assert "1 of 3 shard files are unreadable" in capsys.readouterr().out
  with pytest.raises(BadDataError, match=r"data\.mixture\.laion: 1 of 3 shard files are "
                                         r"unreadable: .*00002\.tar .*> max_bad_ratio=20\.0%"):
    build_mixture(spec, max_bad_ratio=0.2)
