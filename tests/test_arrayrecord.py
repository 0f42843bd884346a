"""ArrayRecord copies of raw records: exact round trip, atomic writes, bad records counted."""

import os

import pytest

from cogvlm_jax.data import demo
from cogvlm_jax.data.mixture import build_mixture
from cogvlm_jax.data.sources import WebDatasetSource
from cogvlm_jax.data.sources.arrayrecord import (ArrayRecordSource, decode_record,
                                                 encode_record, write_arrayrecord)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("ar")
  folder = demo.ensure_demo_data(str(root / "demo"),
                                 demo.DemoSpec(num_train_scenes=10, num_eval_scenes=2),
                                 verbose=False)
  return demo.write_shards(folder, "train", str(root / "shards"), samples_per_shard=4)


def test_record_round_trip():
  record = {"source": "s.tar", "key": "k", "image_bytes": b"\x00\xffpng", "caption": "a ü",
            "metadata": {"boxes": [[0.1, 0.2, 0.3, 0.4]]}, "error": None, "empty": b""}
  assert decode_record(encode_record(record)) == record
  with pytest.raises(ValueError, match="truncated"):
    decode_record(encode_record(record)[:-2])


def test_copy_of_shards_reads_back_identically(shards, tmp_path):
  src = WebDatasetSource(shards)
  paths = write_arrayrecord((src[i] for i in range(len(src))), str(tmp_path / "out" / "laion"),
                            records_per_file=4)
  assert [os.path.basename(p) for p in paths] == [
      f"laion-{i:05d}-of-00003.array_record" for i in range(3)]
  assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
  with pytest.raises(FileExistsError, match="already at"):  # no mixing with an old copy
    write_arrayrecord([], str(tmp_path / "out" / "laion"))
  copy = ArrayRecordSource(str(tmp_path / "out"))
  assert len(copy) == len(src) == 10
  for i in range(len(src)):
    assert copy[i] == src[i]
  # As a mixture source, with the grounding task read from the copied .json.
  (grounding,), _ = build_mixture({"g": dict(kind="arrayrecord", paths=str(tmp_path / "out"),
                                             task="grounding")})
  assert grounding[0]["box_text"].startswith("[[") and grounding[0]["sentence"]


def test_remote_prefix_is_refused():
  with pytest.raises(ValueError, match="writes local files"):
    write_arrayrecord([], "gs://bucket/laion")


def test_interrupted_write_leaves_nothing(tmp_path):
  def records():
    yield {"key": "0", "image_bytes": b"x"}
    raise RuntimeError("source died")

  with pytest.raises(RuntimeError, match="source died"):
    write_arrayrecord(records(), str(tmp_path / "part"))
  assert os.listdir(tmp_path) == []


def test_undecodable_record_is_reported_not_raised(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  path = str(tmp_path / "bad-00000-of-00001.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  writer.write(b"\x01")
  writer.close()
  record = ArrayRecordSource(path)[0]
  assert record["image_bytes"] is None and "undecodable" in record["error"]
