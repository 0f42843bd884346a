"""Evaluation configs for `python eval.py --config configs/eval/<task>.py`."""
