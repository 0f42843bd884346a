"""What the loop reports: per-interval training metrics and their log line.

Records go to `cogvlm_jax.metric_writers` (metrics.jsonl + TensorBoard), one per
`train.log_every` steps.
"""

from __future__ import annotations


def summarise(host: list[dict], elapsed: float, batch_size: int, flops_per_step: float,
               peak_flops: float) -> dict:
  """Means over the interval's steps; loss and grad norm over the finite (applied) ones."""
  n = len(host)
  good = [m for m in host if not float(m["nonfinite"])] or host
  tokens = sum(float(m["tokens"]) for m in host)
  loss_tokens = sum(float(m["loss_tokens"]) for m in host)
  step_time = elapsed / n
  out = {
      "loss": sum(float(m["loss"]) for m in good) / len(good),
      "last_loss": float(host[-1]["loss"]),
      "lr": float(host[-1]["lr"]),
      "grad_norm": sum(float(m["grad_norm"]) for m in good) / len(good),
      "tokens_per_s": tokens / elapsed,
      "loss_tokens_per_step": loss_tokens / n,
      "images_per_s": n * batch_size / elapsed,
      "step_time_ms": 1000 * step_time,
      "skipped_steps": int(sum(float(m["nonfinite"]) for m in host)),
      "tflops_per_s": flops_per_step / step_time / 1e12,
      "mfu": flops_per_step / step_time / peak_flops if peak_flops else float("nan"),
  }
  if any(float(m["z_loss"]) for m in host):
    out["z_loss"] = sum(float(m["z_loss"]) for m in good) / len(good)
  return out


def log_line(step: int, summary: dict) -> str:
  """The one-line progress report of a logged interval."""
  line = (f"step {step:5d} | loss {summary['loss']:.4f} | lr {summary['lr']:.2e} | "
          f"grad_norm {summary['grad_norm']:.3f} | {summary['tokens_per_s']:,.0f} tok/s | "
          f"{summary['images_per_s']:.1f} img/s | {summary['step_time_ms']:.1f} ms/step | "
          f"MFU {summary['mfu']:.1%}")
  if summary["skipped_steps"]:
    line += f" | skipped {summary['skipped_steps']} non-finite"
  if summary.get("data/bad_samples"):
    line += f" | bad samples {summary['data/bad_samples']} of {summary['data/samples']}"
  return line
