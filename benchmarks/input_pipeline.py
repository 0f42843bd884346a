"""Images/s of the Grain input pipeline against a plain PIL loop over the same files.

Writes N LAION-like JPEGs (mixed sizes around 300..640 px, captions) into one webdataset
.tar shard (+ the same files extracted to a folder for the plain loop), then times, in the
same process, at image sizes 224 and 490:

  plain     for each file: open + read, PIL decode, convert("RGB"), resize BICUBIC to S,
            np.asarray, tokenize the caption — one thread, no batching
  pipeline  WebDatasetSource (pread) -> shuffle -> ExampleBuilder (decode_image, resize,
            tokenize, pad) -> batch 32, Grain thread pool with 1 / 2 / 4 threads, and in
            1 / 2 worker PROCESSES (Grain mp_prefetch, 1 thread each; start-up not timed)

Each run is timed after a warm-up (page cache warm for both sides); best of REPEATS.

    python benchmarks/input_pipeline.py [--n 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

from _common import machine_line  # noqa: E402  (puts the repository root on sys.path)

from cogvlm_jax.config import preset  # noqa: E402
from cogvlm_jax.data import demo  # noqa: E402
from cogvlm_jax.data.pipeline import mixture_dataset
from cogvlm_jax.data.sources import WebDatasetSource
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.tokenization import load_tokenizer

BATCH = 32


def make_images(folder: str, n: int) -> tuple[str, list[tuple[str, str]]]:
  """n JPEGs (smooth noise + shapes, like photos compress) in a tar and a folder."""
  rng = np.random.default_rng(0)
  files, members = [], []
  for i in range(n):
    w, h = int(rng.integers(300, 641)), int(rng.integers(300, 641))
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BILINEAR).filter(
        ImageFilter.GaussianBlur(2))
    noise = rng.integers(-12, 13, (h, w, 3))
    im = Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    caption = f"a photo number {i} of a {['red', 'blue', 'green'][i % 3]} circle and a square"
    key = f"{i:06d}"
    path = os.path.join(folder, "files", key + ".jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(buf.getvalue())
    files.append((path, caption))
    members += [(key + ".jpg", buf.getvalue()), (key + ".txt", caption.encode())]
  tar_path = os.path.join(folder, "00000.tar")
  with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return tar_path, files


def plain_loop(files, size: int, tok) -> float:
  t = time.perf_counter()
  for path, caption in files:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      rgb = im.convert("RGB")
    np.asarray(rgb.resize((size, size), Image.BICUBIC), np.uint8)
    tok.encode(caption)
  return len(files) / (time.perf_counter() - t)


def pipeline(src, builder, n: int, threads: int, workers: int = 0) -> float:
  ds = mixture_dataset([src], builder, batch_size=BATCH, seed=0, num_threads=threads,
                       prefetch=2, process_index=0, process_count=1, num_workers=workers)
  it = iter(ds)
  next(it)  # start-up (thread pool, worker processes) not timed
  steps = n // BATCH
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  rate = steps * BATCH / (time.perf_counter() - t)
  it.close()
  return rate


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=512)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  print(machine_line())
  with tempfile.TemporaryDirectory() as tmp:
    folder = demo.ensure_demo_data(os.path.join(tmp, "demo"),
                                   demo.DemoSpec(num_train_scenes=4, num_eval_scenes=1),
                                   verbose=False)
    tok = load_tokenizer(folder)
    tar_path, files = make_images(tmp, args.n)
    src = WebDatasetSource(tar_path)
    print(f"{args.n} JPEGs 300..640 px, {os.cpu_count()} CPU cores, batch {BATCH}, "
          f"best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f} (other "
          f"processes on the machine skew the thread scaling)")
    for size in (224, 490):
      cfg = preset("tiny-cogvlm", vocab_size=demo.VOCAB_SIZE,
                   vision=dict(image_size=size, patch_size=14))
      builder = ExampleBuilder(tok, cfg, max_length=cfg.image_span_length + 64)
      plain_loop(files[:32], size, tok)  # warm-up
      base = max(plain_loop(files, size, tok) for _ in range(args.repeats))
      print(f"S={size}: plain PIL loop {base:8.1f} images/s")
      for threads in (1, 2, 4):
        rate = max(pipeline(src, builder, args.n, threads) for _ in range(args.repeats))
        print(f"S={size}: pipeline {threads} thread(s) {rate:8.1f} images/s "
              f"({rate / base:.2f}x plain)")
      for workers in (1, 2):
        rate = max(pipeline(src, builder, args.n, 1, workers) for _ in range(args.repeats))
        print(f"S={size}: pipeline {workers} worker process(es) {rate:8.1f} images/s "
              f"({rate / base:.2f}x plain)")
      draft = ExampleBuilder(tok, cfg, max_length=cfg.image_span_length + 64, jpeg_draft=True)
      for threads in (1, 2):
        rate = max(pipeline(src, draft, args.n, threads) for _ in range(args.repeats))
        print(f"S={size}: pipeline + jpeg_draft {threads} thread(s) {rate:8.1f} images/s "
              f"({rate / base:.2f}x plain; pixels differ slightly from the reference)")
      assert builder.counter.bad == 0 and draft.counter.bad == 0


if __name__ == "__main__":
  main()
