"""The v3 training chain (issue 21): a few steps of every stage on a tiny model, resume, no test-split reads;
the preset's model is a real LlavaForConditionalGeneration with a >= 12-layer decoder."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from vtprune.testbed import splits
from vtprune.testbed.train import train
from vtprune.testbed.train_v3 import TINY_V3, measure_step_costs, v3_config


def _config(steps_b: int):
    return replace(v3_config(size=TINY_V3), steps_a=2, batch_a=2, steps_b=steps_b, batch_b=2, questions_per_image=3,
                   warmup=1, eval_every=2, eval_per_type=1, save_every=1, keep_schedule="1:32",
                   type_schedule="1:colour", probe_scenes=4, feature_cache=4, cls_steps=1, single_steps=1,
                   single_batch=2)


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
    # --types: only those question types of the split; unknown types and --types without --split are refused
    assert main(["testbed", "score", "--model", str(tmp_path / "model"), "--split", "calibration",
                 "--per-type", "3", "--types", "count,leftof", "--records", str(tmp_path / "r.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and set(out["per_type"]) == {"count", "leftof"}
    ids = [json.loads(line)["id"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(ids) == 6 and all(i.endswith(("-count", "-leftof")) for i in ids)
    assert main(["testbed", "score", "--model", str(tmp_path / "model"), "--split", "calibration",
                 "--types", "count,colours"]) == 2
    assert "unknown question type colours (accepted: colour, shape" in capsys.readouterr().err
    assert main(["testbed", "score", "--model", str(tmp_path / "model"), "--types", "count"]) == 2


def test_v3_preset_model_is_a_deep_llava():
    from transformers import LlavaForConditionalGeneration

    from vtprune.testbed.data_v3 import build_model

    cfg = v3_config()
    assert cfg.size.text_layers >= 12 and cfg.eval_seed == splits.CALIBRATION_SEED
    model = build_model(cfg.size)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == 576
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14


def test_v3_preset_asks_the_look_ups_first_then_every_scored_type():
    from vtprune.testbed.datasets import get_dataset
    from vtprune.testbed.train import types_at

    cfg, ds = v3_config(), get_dataset("shapes-v3")

    def at(step: int) -> set[str]:
        return set(types_at(cfg.type_schedule, step, cfg.training_types, ds.question_types, ds.training_types))

    assert at(0) == {"colour", "shape"} and at(1000) == {"colour", "shape", "exist"}
    # by then every scored type, plus the position questions that are never scored
    assert at(cfg.single_steps) == set(ds.question_types) | {"side", "upper"}
    assert {"side", "upper"} <= set(ds.training_types) and not {"side", "upper"} & set(ds.question_types)
    assert cfg.column_code_scale > 0 and cfg.row_code_scale > 0  # both position codes from the probe init
    assert cfg.fetch_weight > 0 and cfg.fetch_layer == 0  # the answer-position read-out, at half the depth


@pytest.mark.slow
def test_v3_step_costs_are_measured():
    """Seconds per step of the preset's stages (one thread); slow: builds the full v3 model and runs 2 steps
    of each stage."""
    costs = measure_step_costs(v3_config(), steps=1, keep=(96, None))
    assert costs["stage_a_s_per_step"] > 0 and costs["stage_b_s_per_step_keep_576"] > 0
    assert costs["stage_b_single_s_per_step_keep_16"] > 0  # the preset's single-question phase


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


def test_single_question_phase_then_packing_and_resume(tmp_path):
    """`single_steps`: Stage B's first steps read `single_batch` scenes with one question per sequence, later steps
    the packed batches; the scene counter survives a resume, so no scene is skipped or repeated early."""
    cfg = replace(_config(2), single_steps=1, single_batch=3, keep_schedule="", eval_every=10, cls_steps=0)
    threads = torch.get_num_threads()
    try:
        train(tmp_path, cfg, progress=False, log=lambda _: None)
        train(tmp_path, replace(cfg, steps_b=3), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    from vtprune import checkpointing as cpt

    st = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")["st"]
    assert int(st["scenes_b"]) == 3 + 2 + 2  # one single-question step of 3 scenes, then two packed steps of 2


def test_shorten_keeps_object_centres_and_digits_first():
    """v3 batches carry a priority map: every object's centre patch and every digit patch are kept before other
    object patches, so a short sequence still shows every object a question can name."""
    from vtprune.testbed import data_v3
    from vtprune.testbed.data import Packing
    from vtprune.testbed.scenes_v3 import CELL, GRID, key_patches
    from vtprune.testbed.train import shorten

    split = splits.train_split(1)
    batch = data_v3.question_batch(split, 0, 4, Packing(2), with_pixels=False)
    assert batch["priority"].shape == (4, 576)
    assert torch.equal(batch["priority"] > 0, batch["informative"])  # priority only reorders informative patches
    feats = torch.arange(576.0).view(1, 576, 1).expand(4, 576, 1).contiguous()
    for b in range(4):
        scene = split.scene(b)
        _, lab, _ = data_v3.render_with_targets(scene, image=False)
        key = key_patches(scene, lab["digit"])
        for o in scene.objects:
            assert key[min(GRID - 1, int(o.cy // CELL)) * GRID + min(GRID - 1, int(o.cx // CELL))]
        assert key[(lab["digit"] > 0).reshape(-1)].all()
        assert torch.equal(torch.from_numpy(key), batch["priority"][b] == 2)
    n_key = int((batch["priority"] == 2).sum(1).max())
    _, short = shorten(batch, feats, n_key, torch.Generator().manual_seed(0))
    for b in range(4):
        kept = set(short[b, :, 0].long().tolist())
        assert set(torch.nonzero(batch["priority"][b] == 2).flatten().tolist()) <= kept


def test_train_cli_takes_zero_stage_b_steps_and_the_single_question_phase(tmp_path, monkeypatch):
    """`--steps-b 0` means no Stage B (it used to fall back to the preset's 5,000 steps)."""
    import vtprune.testbed.train as train_module
    from vtprune.cli import main

    seen = []
    monkeypatch.setattr(train_module, "train", lambda out, cfg, **kw: seen.append(cfg))
    assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path), "--steps-b", "0",
                 "--single-steps", "5", "--single-batch", "32"]) == 0
    assert (seen[0].steps_b, seen[0].single_steps, seen[0].single_batch) == (0, 5, 32)
    assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path)]) == 0
    assert seen[1].steps_b == v3_config().steps_b


def test_train_cli_precision_and_procs(tmp_path, monkeypatch):
    """`--precision auto` follows the CPU's bf16 support (`fast_bf16`); `--procs N` hands the run to
    `parallel_launch.train_parallel`; a batch that `--procs` does not divide is a one-line usage error."""
    import vtprune.testbed.parallel_launch as parallel_module
    import vtprune.testbed.train as train_module
    from vtprune.cli import main

    single, multi = [], []
    monkeypatch.setattr(train_module, "train", lambda out, cfg, **kw: single.append(cfg))
    monkeypatch.setattr(parallel_module, "train_parallel", lambda out, cfg, **kw: multi.append(cfg))
    for precision, want in (("fp32", False), ("bf16", True), ("auto", train_module.fast_bf16("cpu"))):
        assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path), "--precision", precision]) == 0
        assert single[-1].bf16 is want and single[-1].procs == 1
    assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path), "--procs", "2"]) == 0
    assert multi[-1].procs == 2 and len(single) == 3
    assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path), "--procs", "3"]) == 2
    assert len(multi) == 1


def test_fast_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    from vtprune.testbed import train as train_module

    assert train_module.fast_bf16("cuda:0")
    info = tmp_path / "cpuinfo"
    real_path = train_module.Path

    def fake_path(p, *a):
        return info if str(p) == "/proc/cpuinfo" else real_path(p, *a)

    monkeypatch.setattr(train_module, "Path", fake_path)
    info.write_text("flags : fpu avx512f avx512_vnni\n")
    assert not train_module.fast_bf16("cpu")
    info.write_text("flags : fpu avx512f avx512_bf16\n")
    assert train_module.fast_bf16("cpu")
    info.write_text("flags : fpu amx_bf16 amx_tile\n")
    assert train_module.fast_bf16("cpu")



def test_stage_c_before_stage_b_tunes_the_starting_model_and_the_frozen_tower_keeps_it(tmp_path, monkeypatch):
    """`cls_before_b`: Stage C runs once, on the model Stage B starts from, before any Stage-B step (also across a
    resume); Stage B leaves the tuned [CLS] embedding as it is (frozen tower) and nothing is tuned after it; with a
    tower Stage B would train, the run is refused before any work."""
    from vtprune.testbed import cls_saliency
    from vtprune.testbed.builtin import resolve_model

    def cls_embedding(model):
        return cls_saliency._tower(model).embeddings.class_embedding.detach().float().clone()

    tuned, logs = [], []
    original = cls_saliency.tune_cls_embedding

    def recording(model, *args, **kwargs):
        logs.append("tune")
        out = original(model, *args, **kwargs)
        tuned.append(cls_embedding(model))
        return out

    monkeypatch.setattr(cls_saliency, "tune_cls_embedding", recording)
    threads = torch.get_num_threads()
    try:
        train(tmp_path / "start", replace(_config(1), steps_a=1, cls_steps=0, eval_every=1), progress=False,
              log=lambda _: None)
        cfg = replace(_config(2), init=str(tmp_path / "start" / "model"), steps_a=0, single_steps=0, keep_schedule="",
                      column_code_scale=0.0, row_code_scale=0.0, feature_cache=0, cls_steps=3, cls_before_b=True,
                      export_final=True, eval_every=1)
        train(tmp_path / "run", cfg, progress=False, log=logs.append)
        train(tmp_path / "run", replace(cfg, steps_b=3), progress=False, log=logs.append)  # resumed, longer
        with pytest.raises(ValueError, match="cls_before_b needs a frozen tower"):
            train(tmp_path / "bad", replace(cfg, tower_lr_b=1e-4), progress=False, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert logs.count("tune") == 1 and logs.index("tune") < min(i for i, m in enumerate(logs) if "B-eval" in m
                                                               or m.startswith("exported"))
    start, _ = resolve_model(tmp_path / "start" / "model")
    final, _ = resolve_model(tmp_path / "run" / "model")
    assert not torch.equal(cls_embedding(start), tuned[0])  # Stage C moved it ...
    torch.testing.assert_close(cls_embedding(final), tuned[0].half().float())  # ... and Stage B kept it (fp16 export)
    history = json.loads((tmp_path / "run" / "train_summary.json").read_text())["history"]
    assert [h["stage"] for h in history].count("C") == 1
    assert not (tmp_path / "bad" / "model").exists()


def test_learning_rate_follows_the_time_limit_when_it_binds_first(tmp_path, monkeypatch):
    """`anneal_by_time`: a Stage B its time limit ends (here after about 4 of 100 steps, on a fake clock) reaches the
    cosine's floor by then; without it, it ends near its peak learning rate, as the chain's phases did."""
    import types as pytypes

    from vtprune import checkpointing as cpt
    from vtprune.testbed import train as train_module

    assert train_module._schedule(10, 100, 0, time_done=1.0) == pytest.approx(0.1)
    assert train_module._schedule(10, 100, 0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.1)))
    assert train_module._schedule(0, 100, 5, time_done=1.0) == pytest.approx(0.2)  # warm-up first

    def last_lr(folder, anneal):
        clock = iter(range(0, 10**6))  # every reading of the clock: one more second
        monkeypatch.setattr(train_module, "time", pytypes.SimpleNamespace(time=lambda: float(next(clock))))
        cfg = replace(_config(100), steps_a=0, single_steps=0, warmup=0, eval_every=1000, cls_steps=0,
                      feature_cache=0, keep_schedule="", time_limit_b=6.0, anneal_by_time=anneal, export_final=True)
        threads = torch.get_num_threads()
        try:
            train(folder, cfg, progress=False, log=lambda _: None)
        finally:
            torch.set_num_threads(threads)
        state = cpt.load_state(cpt.latest(folder / "state", ""), "state", "cpu")
        assert 1 < state["st"]["step"] < 100  # the time limit ended Stage B
        return state["opt_b"]["param_groups"][0]["lr"] / cfg.lr_b

    assert last_lr(tmp_path / "annealed", True) < 0.3
    assert last_lr(tmp_path / "steps", False) > 0.95


def test_train_cli_passes_the_attention_target_flags(tmp_path, monkeypatch):
    """The training-only attention targets' flags reach `TrainConfig` (a flag that parses but is dropped would
    run a different experiment than the one logged)."""
    import vtprune.testbed.train as train_module
    from vtprune.cli import main

    seen = []
    monkeypatch.setattr(train_module, "train", lambda out, cfg, **kw: seen.append(cfg))
    assert main(["testbed", "train", "--preset", "v3", "--out", str(tmp_path), "--fetch-attention-weight", "0.5",
                 "--fetch-attention-layer", "2", "--fetch-attention-at", "name", "--fetch-relay-layer", "3",
                 "--fetch-neighbour-layer", "4", "--count-attention-weight", "1", "--count-attention-layer", "3",
                 "--count-sink-weight", "4", "--count-attention-at", "name", "--count-attention-unit", "object",
                 "--count-attention-heads", "4:0,4:1", "--count-mark", "centre+top", "--cls-drift-weight", "20"]) == 0
    cfg = seen[0]
    assert (cfg.fetch_attention_weight, cfg.fetch_attention_layer, cfg.fetch_attention_at) == (0.5, 2, "name")
    assert (cfg.fetch_relay_layer, cfg.fetch_neighbour_layer) == (3, 4)
    assert (cfg.count_attention_weight, cfg.count_attention_layer, cfg.count_sink_weight) == (1.0, 3, 4.0)
    assert (cfg.count_attention_at, cfg.count_attention_unit) == ("name", "object")
    assert cfg.count_attention_heads == "4:0,4:1" and cfg.count_mark == "centre+top"
    assert cfg.cls_drift_weight == 20.0
