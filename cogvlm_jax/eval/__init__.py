"""Evaluation of CogVLM: one file per task, each with its loader, scorer and `run`.

    python eval.py --config configs/eval/<task>.py --config.checkpoint=PATH --workdir OUT
    from cogvlm_jax.eval.tasks import run_eval          # what eval.py calls
    from cogvlm_jax.eval import demo; demo.run(config, workdir, model=..., tokenizer=...)

* tasks: `caption.py` (BLEU / CIDEr / ROUGE-L via pycocoevalcap), `vqa.py` (the official VQA
  accuracy; legacy and TextVQA modes), `refcoco.py` (REC accuracy), `pope.py` (POPE yes/no),
  `demo.py` (the demo's held-out split with baselines); `tasks.py` is the table of them.
* the shared driver `evaluator.py` (load -> generate the missing predictions -> score ->
  write), `generator.py` (batched, bucketed generation), `outputs.py` (predictions.jsonl,
  eval_run.json, metrics.json, TensorBoard), `report.py` (HTML), `settings.py` (the config,
  merged with configs/eval/_base.py and checked).

All scores are percentages (x100), as papers report them; counts are plain integers.
"""
