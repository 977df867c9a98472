"""End-to-end training smoke test on a tiny model: both stages, export, resume, reload."""

from __future__ import annotations

import json

import torch

from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data import balanced_samples
from vtprune.testbed.evaluate import evaluate
from vtprune.testbed.model import TINY
from vtprune.testbed.train import TrainConfig, train


def _config(steps_b: int) -> TrainConfig:
    return TrainConfig(size=TINY, steps_a=2, batch_a=2, steps_b=steps_b, batch_b=2, questions_per_image=3,
                       warmup=1, eval_every=2, eval_per_type=1, save_every=1)


def test_tiny_training_runs_exports_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    try:
        train(tmp_path, _config(2), progress=False, log=lambda _: None)
        summary = json.loads((tmp_path / "train_summary.json").read_text())
        stages = [h["stage"] for h in summary["history"]]
        assert "A" in stages and "B-eval" in stages
        train(tmp_path, _config(4), progress=False, log=lambda _: None)  # resumes Stage B from step 2
        summary = json.loads((tmp_path / "train_summary.json").read_text())
        assert [h["step"] for h in summary["history"] if h["stage"] == "B-eval"] == [2, 4]
    finally:
        torch.set_num_threads(threads)
    model, processor = resolve_model(tmp_path / "model")
    assert next(model.parameters()).dtype == torch.float32
    res = evaluate(model, processor, balanced_samples(seed=3, n_per_type=1), batch_size=6)
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert {r["prediction"] for r in res["records"]} <= set(processor.tokenizer.get_vocab())
