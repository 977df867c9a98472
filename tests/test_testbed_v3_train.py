"""The v3 training chain (issue 21): a few steps of every stage on a tiny model, resume, no test-split reads;
the preset's model is a real LlavaForConditionalGeneration with a >= 12-layer decoder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vtprune.testbed import splits
from vtprune.testbed.train import train
from vtprune.testbed.train_v3 import TINY_V3, measure_step_costs, v3_config


def _config(steps_b: int):
    return replace(v3_config(size=TINY_V3), steps_a=2, batch_a=2, steps_b=steps_b, batch_b=2, questions_per_image=3,
                   warmup=1, eval_every=2, eval_per_type=1, save_every=1, keep_schedule="1:32",
                   type_schedule="1:colour", probe_scenes=4, feature_cache=4, cls_steps=1)


def test_v3_chain_smoke_runs_resumes_and_never_reads_the_test_split(tmp_path, monkeypatch):
    read: set[str] = set()
    scene = splits.Split.scene

    def spy(self, index):
        read.add(self.name)
        return scene(self, index)

    monkeypatch.setattr(splits.Split, "scene", spy)
    threads = torch.get_num_threads()
    try:
        train(tmp_path, _config(2), progress=False, log=lambda _: None)
        train(tmp_path, _config(3), progress=False, log=lambda _: None)  # resumes Stage B from step 2
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["data_version"] == "shapes-v3" and len(summary["question_types"]) == 7
    assert [h["step"] for h in summary["history"] if h["stage"] == "B-eval"] == [2, 3]
    assert {"A", "probe", "C"} <= {h["stage"] for h in summary["history"]}
    assert read == {"train", "calibration"}  # watched on calibration, trained on train, test never read
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.data_v3 import vocabulary

    model, processor = resolve_model(tmp_path / "model")
    assert processor.tokenizer.get_vocab() == vocabulary()
    assert model.config.text_config.num_hidden_layers == TINY_V3.text_layers
    # the model card scores the test split's three seeds, with Wilson intervals (installed into a temp assets dir)
    from vtprune.testbed import card

    monkeypatch.setattr(card, "ASSETS", tmp_path / "assets")
    info = card.install(tmp_path, name="v3-smoke", per_type=1)
    held = info["heldout"]
    assert info["data_version"] == "shapes-v3" and held["seeds"] == list(splits.TEST_SEEDS)
    assert "test" in read and set(held["per_seed_accuracy"]) == set(splits.TEST_SEEDS)
    lo, hi = held["wilson95"]
    assert 0 <= lo <= held["accuracy"] <= hi <= 1 and len(held["wilson95_per_type"]) == 7


def test_v3_score_cli_reads_a_split(tmp_path, capsys):
    """`vtprune testbed score --split calibration` scores a v3 model on that split's questions."""
    from vtprune.cli import main

    threads = torch.get_num_threads()
    try:
        train(tmp_path, replace(_config(1), steps_a=1, cls_steps=0, eval_every=1), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert main(["testbed", "score", "--model", str(tmp_path / "model"), "--split", "calibration",
                 "--per-type", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 7 and set(out["per_type"]) == set(json.loads(
        (tmp_path / "train_summary.json").read_text())["question_types"])
    assert main(["testbed", "score", "--model", str(tmp_path / "model"), "--split", "heldout"]) == 2


def test_v3_preset_model_is_a_deep_llava():
    from transformers import LlavaForConditionalGeneration

    from vtprune.testbed.data_v3 import build_model

    cfg = v3_config()
    assert cfg.size.text_layers >= 12 and cfg.eval_seed == splits.CALIBRATION_SEED
    model = build_model(cfg.size)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == 576
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14


@pytest.mark.slow
def test_v3_step_costs_are_measured():
    """Seconds per step of the preset's stages (one thread); slow: builds the full v3 model and runs 2 steps
    of each stage."""
    costs = measure_step_costs(v3_config(), steps=1, keep=(96, None))
    assert costs["stage_a_s_per_step"] > 0 and costs["stage_b_s_per_step_keep_576"] > 0


@pytest.mark.slow
def test_v3_longer_smoke_learns_the_dense_targets(tmp_path):
    """40 Stage-A and 40 Stage-B steps of the tiny v3 chain: Stage A's dense loss falls (a few minutes on one
    thread)."""
    cfg = replace(_config(40), steps_a=40, batch_a=4, eval_every=20, eval_per_type=2, save_every=20,
                  keep_schedule="20:32", type_schedule="20:colour", feature_cache=16, cls_steps=5)
    threads = torch.get_num_threads()
    try:
        train(tmp_path, cfg, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    history = json.loads((tmp_path / "train_summary.json").read_text())["history"]
    a_loss = [h["loss"] for h in history if h["stage"] == "A"]
    assert a_loss[-1] < a_loss[0]
    assert [h["step"] for h in history if h["stage"] == "B-eval"] == [20, 40]
