"""Selection apart from the score: the validation set picks, the test set scores, once.

During training only the validation set is evaluated (`val/*`: early stopping, checkpoint selection, the
scheduler's intermediate reports). After training, `train.checkpoint` picks the weights — `final` (those at
the end) or `best_val` (those of the evaluation with the best `train.checkpoint_metric`; null: `val/acc`, or
`val/loss` for language modelling) — and the test set (`task.test_batches`: the validation distribution from
another seed) is evaluated once on them (`test/*`). With `best_val` the trial's `val/*` are those of the
selected evaluation, so every metric of the final record belongs to the same weights. The record says which:
`trial/checkpoint` (the policy, a run tag) and `train/selected_step`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from hqlt.search_space.vocabulary import (CHECKPOINT, LOWER_IS_BETTER, SELECTED_STEP, VAL_ACC, VAL_LOSS,
                                          VAL_PREFIX)

from . import trainer


class Checkpoints:
    """Wraps the trainer's `report` callback: sees every evaluation, keeps the best weights (best_val)."""

    def __init__(self, model, cfg, task, report: Optional[Callable[[dict], None]] = None):
        self.model, self.cfg, self.task, self.inner = model, cfg, task, report
        self.policy = cfg.checkpoint
        self.metric = cfg.checkpoint_metric or (VAL_LOSS if task.kind == "lm" else VAL_ACC)
        self.sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        self.best: Optional[float] = None
        self.best_state: Optional[dict] = None
        self.best_eval: dict = {}
        self.best_step: Optional[int] = None

    def report(self, metrics: dict) -> None:
        if self.policy == "best_val":
            value = metrics.get(self.metric)
            finite = value is not None and math.isfinite(value)
            if finite and (self.best is None or self.sign * value > self.sign * self.best):
                self.best, self.best_step = value, int(metrics.get("step", 0))
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.best_eval = {k: v for k, v in metrics.items() if k.startswith(VAL_PREFIX)}
        if self.inner is not None:
            self.inner(metrics)

    def state_dict(self) -> dict:
        """What a seed snapshot keeps of the selection (the best evaluation so far and its weights)."""
        return {"best": self.best, "best_step": self.best_step, "best_state": self.best_state,
                "best_eval": self.best_eval}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_state, self.best_eval = state["best_state"], dict(state["best_eval"])

    def finish(self, final: dict, device) -> dict:
        """The final record: `final` (the trainer's last metrics), with the selected checkpoint's validation
        metrics and the test metrics of its weights."""
        step = int(final.get("step", 0))
        out = dict(final)
        if self.policy == "best_val" and self.best_state is not None and self.best_step != step:
            self.model.load_state_dict(self.best_state)
            out = {k: v for k, v in out.items() if not k.startswith(VAL_PREFIX)}
            out.update(self.best_eval)
            step = self.best_step
        self.best_state = None
        test = trainer.evaluate(self.model, self.task, self.cfg.eval_batch_size, device, self.cfg.precision,
                                split="test")
        return {**out, **test, CHECKPOINT: self.policy, SELECTED_STEP: float(step)}


__all__ = ["Checkpoints"]
