"""Command-line chat, captioning and grounding with a CogVLM checkpoint, streaming tokens.

    python -m cogvlm_jax.chat --checkpoint CKPT --image cat.jpg --query "What is in the image?"
    python -m cogvlm_jax.chat --checkpoint CKPT --image cat.jpg            # interactive
    python -m cogvlm_jax.chat --checkpoint CKPT --image cat.jpg --template base \\
        --query "Where is the cat?" --draw boxes.png                      # grounding
    python -m cogvlm_jax.chat --checkpoint COGAGENT --image shot.png \\
        --query "Where is the search box?"                                 # CogAgent

CogAgent reads the image twice: at the low resolution (224 px) and at cross_image_size
(1120 px) for its high-resolution tower; --cross_image gives that tower another file (e.g. a
sharper copy of the screenshot). CogAgent has no text-only prompts: it needs --image.

CKPT is anything `cogvlm_jax.from_pretrained` reads. The tokenizer (`tokenizer.model` or
`tokenizer.json`) is taken from the checkpoint folder (a training workdir carries its run's)
unless --tokenizer names another. The template defaults to the checkpoint's
`template_version`; a model trained on several (the demo: `vqa` for questions, `base` for
captions and grounding) answers best in the one its task was trained with. Bad input ends
with one line `error: ...` and exit status 2 (--debug shows the traceback).
In interactive mode the conversation history is kept; type `clear` to reset it, an empty
line or `exit` to quit.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence, TextIO

import jax.numpy as jnp
import numpy as np
from PIL import ImageDraw

from cogvlm_jax.cli import add_debug_argument, run_main
from cogvlm_jax.generate import generate_stream
from cogvlm_jax.image_processing import load_image
from cogvlm_jax.pretrained import from_pretrained
from cogvlm_jax.data.examples import ExampleBuilder
from cogvlm_jax.tokenization import SENTENCEPIECE_FILE, TOKENIZERS_FILE, load_tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m cogvlm_jax.chat", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="checkpoint folder")
  p.add_argument("--tokenizer", help="tokenizer folder/file (default: the checkpoint folder)")
  p.add_argument("--image", help="image file (the conversation's one image)")
  p.add_argument("--cross_image", "--cross-image", dest="cross_image",
                 help="CogAgent: the high-resolution tower's image (default: --image)")
  p.add_argument("--query", help="one-shot: answer this and exit")
  p.add_argument("--template", choices=("base", "chat", "vqa", "chat_old"),
                 help="prompt template (default: the checkpoint's template_version)")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
  p.add_argument("--draw", help="grounding: draw the boxes of the answer onto the image here")
  add_debug_argument(p)
  return p.parse_args(argv)


class Chat:
  """One conversation: a model, a tokenizer, an optional image (CogAgent: required, and an
  optional cross_image for its high-resolution tower) and the history."""

  def __init__(self, model, tokenizer, image=None, template=None, cross_image=None,
               **sampling):
    self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
    cogagent = model.config.cross_vision is not None
    if cogagent and image is None:
      raise ValueError("CogAgent needs --image: it has no text-only prompts")
    if cross_image is not None and not cogagent:
      raise ValueError("--cross_image is for CogAgent checkpoints only (this one is "
                       f"{model.config.variant!r})")
    self.image = load_image(image) if image is not None else None
    self.cross_image = load_image(cross_image) if cross_image is not None else None
    self.template = template
    self.history: list[tuple[str, str]] = []
    # The one prompt builder of training and eval (max_length is for training rows only).
    self.builder = ExampleBuilder(tokenizer, model.config, max_length=0)

  def answer(self, query: str, out: TextIO) -> str:
    """Streams the answer to `out` as it is generated and returns it."""
    inputs = self.builder.prompt({"query": query, "template": self.template,
                                  "history": self.history, "image": self.image,
                                  "cross_image": self.cross_image})
    images = inputs["images"][None] if "images" in inputs else None
    cross = inputs["cross_images"][None] if "cross_images" in inputs else None
    stop = [t for t in (self.tokenizer.eos_token_id, self.model.config.eos_token_id)
            if t is not None]
    ids: list[int] = []
    shown = ""
    for token in generate_stream(self.model, inputs["input_ids"][None],
                                 inputs["token_type_ids"][None],
                                 inputs["attention_mask"][None],
                                 None if images is None else jnp.asarray(images),
                                 stop_token_ids=stop, cross_images=cross, **self.sampling):
      token = int(token[0])
      if token in stop:
        break
      ids.append(token)
      # Decode the whole answer each time: sentencepiece spacing depends on the context.
      text = self.tokenizer.decode(ids)
      out.write(text[len(shown):])
      out.flush()
      shown = text
    out.write("\n")
    self.history.append((query, shown))
    return shown


def draw_boxes(image, answer: str, path: str) -> int:
  """Draws the boxes CogVLM wrote in `answer` onto `image`; returns how many."""
  from cogvlm_jax.boxes import parse_boxes
  boxes = parse_boxes(answer) or []
  canvas = load_image(image).copy()
  draw = ImageDraw.Draw(canvas)
  w, h = canvas.size
  for x0, y0, x1, y1 in boxes:
    draw.rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=(255, 0, 0), width=3)
  canvas.save(path)
  return len(boxes)


def find_tokenizer(args: argparse.Namespace) -> str:
  """--tokenizer, else the first of the checkpoint's folders (`checkpoint.tokenizer_folders`:
  the folder itself, a step dir's workdir) that holds a tokenizer."""
  from cogvlm_jax.checkpoint import tokenizer_folders
  if args.tokenizer:
    return args.tokenizer
  folders = tokenizer_folders(args.checkpoint)
  for folder in folders:
    if any(os.path.isfile(os.path.join(folder, f)) for f in (SENTENCEPIECE_FILE, TOKENIZERS_FILE)):
      return folder
  raise FileNotFoundError(f"no {SENTENCEPIECE_FILE} or {TOKENIZERS_FILE} in {folders}; pass "
                          "--tokenizer FOLDER")


def main(argv: Sequence[str] | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout) -> int:
  """The command; bad input ends with one line `error: ...` (cli.run_main) unless --debug."""
  args = parse_args(argv)
  if args.draw and args.image is None:
    raise SystemExit("--draw needs --image")
  return run_main(lambda: _chat(args, stdin, stdout), debug=args.debug)


def _chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
  """Loads the model, then answers --query or reads queries from stdin."""
  tokenizer = load_tokenizer(find_tokenizer(args))  # before the (slow) model load
  for flag, path in (("--image", args.image), ("--cross_image", args.cross_image)):
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f"{flag} {path} does not exist")
  model = from_pretrained(args.checkpoint, dtype=args.dtype)
  chat = Chat(model, tokenizer, args.image, args.template, cross_image=args.cross_image,
              max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed)
  if args.query is not None:
    answer = chat.answer(args.query, stdout)
    if args.draw:
      n = draw_boxes(args.image, answer, args.draw)
      stdout.write(f"[{n} box(es) drawn to {args.draw}]\n")
    return 0
  while True:
    stdout.write("> ")
    stdout.flush()
    query = stdin.readline()
    if not query or query.strip() in ("", "exit", "quit"):
      return 0
    if query.strip() == "clear":
      chat.history.clear()
      continue
    chat.answer(query.strip(), stdout)


if __name__ == "__main__":
  sys.exit(main())
