"""RCP training on CPU: data, a few steps, resume, 2-process DDP (gloo), δ calibration, checkpoints, CLI."""

from __future__ import annotations

import argparse
import json
import os
import random
import socket

import pytest
import torch
from factories import tiny_testbed_size

from vtprune.errors import BudgetError, UnsupportedModelError
from vtprune.rcp.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, model_signature
from vtprune.rcp.data import Collator, read_examples
from vtprune.rcp.modules import RCPPlugins
from vtprune.rcp.placement import placement_for
from vtprune.rcp.train import (
    RCPTrainConfig,
    batch_to_route,
    calibrate_delta,
    check_feasible,
    kept_tokens,
    train,
)

torch.set_num_threads(1)
SMALL = dict(d_prime=32, bottleneck=32, calib_n=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 6-layer testbed-vocabulary LLaVA saved with its processor, and a 12-question exported JSONL."""
    from vtprune.testbed import build_model, build_processor, export_jsonl

    root = tmp_path_factory.mktemp("rcp")
    size = tiny_testbed_size(text_layers=6)  # tiny widths, 6 decoder layers: room for 3 pruners + repair
    model_dir = root / "model"
    build_model(size, seed=0).save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    data = export_jsonl(root / "data", seed=5, n_per_type=2)
    return model_dir, data, root


def _load(model_dir):
    from vtprune.runner import load

    return load(str(model_dir))


def _plugins(summary) -> dict:
    return {k: v.detach().clone() for k, v in summary["plugins"].state_dict().items()}


def test_collator_targets_are_answer_plus_eos_at_predicting_positions(setup):
    model_dir, data, _ = setup
    loaded = _load(model_dir)
    examples = read_examples(data)
    assert len(examples) == 12 and examples[0].image.exists() and examples[0].key.startswith("shapes-")
    batch = Collator(loaded)(examples[:3])
    tok = loaded.tokenizer
    for b, e in enumerate(examples[:3]):
        gen = (batch["targets"][b] != -100).nonzero().flatten()
        want = tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["targets"][b, gen].tolist() == want
        assert int(gen[0]) == int(batch["prompt_end"][b])  # the last prompt token predicts the first answer token
        ids = batch["input_ids"][b]
        assert ids[gen + 1].tolist() == want  # teacher forcing: the target is the next input token
        text = tok.decode(
            ids[batch["attention_mask"][b].bool()][
                : int(batch["prompt_end"][b]) + 1 - int((batch["attention_mask"][b] == 0).sum())
            ]
        )
        assert text.count("<image>") == 576 and text.endswith("assistant :") and e.question.split()[0].lower() in text
    assert batch["pixel_values"].shape == (3, 3, 336, 336)


def test_training_moves_plugins_keeps_backbone_and_logs(setup, tmp_path):
    model_dir, data, _ = setup
    loaded = _load(model_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = RCPTrainConfig(steps=3, batch=2, grad_accum=2, lr=1e-3, **SMALL)
    summary = train(
        str(model_dir),
        data,
        tmp_path,
        cfg,
        device="cpu",
        progress=False,
        loaded=loaded,
        return_plugins=True,
        log=lambda *_: None,
    )
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen backbone, bit-identical
    assert all(not p.requires_grad for p in loaded.model.parameters())
    torch.manual_seed(cfg.seed)  # the trainer's initialisation, redone
    random.seed(cfg.seed)
    init = RCPPlugins(32, placement_for(6, 64 / 576), d_prime=32, bottleneck=32).state_dict()
    trained = _plugins(summary)
    moved = [k for k in init if not torch.equal(init[k], trained[k])]
    assert len(moved) > len(init) // 2 and "pruner.0.beta" in moved and "dra.4.a" in moved
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(set(r) >= {"loss", "task", "repair", "sparse", "r_bar", "r_k", "tau", "lr", "r_target"} for r in log)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and 0 < r["r_bar"] <= 1 for r in log)
    assert log[0]["tau"] == 1.5 and log[0]["r_target"] == 1.0 and len(log[0]["r_k"]) == 3
    assert (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / CONFIG_NAME).exists()
    assert summary["trainable_parameters"] == sum(v.numel() for v in init.values())


def test_resume_equals_uninterrupted_run(setup, tmp_path):
    model_dir, data, _ = setup
    cfg = RCPTrainConfig(steps=4, batch=1, grad_accum=2, lr=1e-3, save_every=100, **SMALL)
    kw = dict(device="cpu", progress=False, return_plugins=True, log=lambda *_: None)
    full = train(str(model_dir), data, tmp_path / "a", cfg, **kw)
    part = RCPTrainConfig(**{**cfg.__dict__, "stop_after": 2})
    first = train(str(model_dir), data, tmp_path / "b", part, **kw)
    assert first["steps_done"] == 2 and not (tmp_path / "b" / WEIGHTS_NAME).exists()
    second = train(str(model_dir), data, tmp_path / "b", cfg, resume="require", **kw)
    assert second["steps_done"] == 4
    a, b = _plugins(full), _plugins(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "wall"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    cfg = RCPTrainConfig(steps=2, batch=1, grad_accum=2, lr=1e-3, **SMALL)
    summary = train(model_dir, data, out, cfg, device="cpu", progress=False, return_plugins=True, log=lambda *_: None)
    torch.save(_plugins(summary), os.path.join(out, f"rank{rank}.pt"))
    # the differentiable all-gather: rank r holds 3 + r rows; gradients equal world × the single-process ones
    import torch.distributed as dist

    from vtprune.rcp.losses import gather_rows, moment_loss

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3 + r, 5, generator=g) for r in range(world)]
    teach = [torch.randn(4, 5, generator=g) for _ in range(world)]
    x = rows[rank].clone().requires_grad_(True)
    moment_loss(gather_rows(x), gather_rows(teach[rank])).backward()
    full = torch.cat(rows).requires_grad_(True)
    moment_loss(full, torch.cat(teach)).backward()
    start = sum(3 + r for r in range(rank))
    ok = torch.allclose(x.grad, world * full.grad[start : start + 3 + rank], atol=1e-6)
    torch.save(ok, os.path.join(out, f"gather{rank}.pt"))
    dist.barrier()


def test_two_processes_gloo_identical_weights(setup, tmp_path):
    import torch.multiprocessing as mp

    model_dir, data, _ = setup
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(model_dir), str(data), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert torch.load(tmp_path / "gather0.pt") and torch.load(tmp_path / "gather1.pt")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["training"]["world_size"] == 2


def test_calibration_reaches_the_budget(setup):
    model_dir, data, _ = setup
    loaded = _load(model_dir)
    model = loaded.model.requires_grad_(False)
    cfg = RCPTrainConfig(budget=64)
    torch.manual_seed(0)
    plugins = RCPPlugins(32, placement_for(6, 64 / 576), d_prime=32, bottleneck=32).eval()
    collate = Collator(loaded)
    examples = read_examples(data)
    routes = [batch_to_route(model, collate(examples[i : i + 4]), "cpu") for i in range(0, 8, 4)]
    res = calibrate_delta(model, plugins, routes, 64 / 576, cfg, log=lambda *_: None)
    assert res["target"] == pytest.approx(64.0)
    assert abs(res["kept"] - 64) <= 0.01 * 64 or abs(res["delta"]) > 9.99
    assert kept_tokens(model, plugins, routes, res["delta"], cfg) == pytest.approx(res["kept"])
    assert kept_tokens(model, plugins, routes, res["delta"] + 1.0, cfg) >= res["kept"]  # monotone in δ


def test_checkpoint_round_trip_and_architecture_refusal(setup, tmp_path):
    from vtprune.testing import tiny_llava, tiny_llava_next

    model_dir, data, _ = setup
    cfg = RCPTrainConfig(
        steps=1, batch=2, grad_accum=1, d_prime=32, bottleneck=32, calib_n=2, calib_batch=2, save_dtype="fp16"
    )
    summary = train(
        str(model_dir), data, tmp_path, cfg, device="cpu", progress=False, return_plugins=True, log=lambda *_: None
    )
    loaded = _load(model_dir)
    plugins, config = load_checkpoint(tmp_path, loaded.model)
    trained = _plugins(summary)
    assert all(torch.equal(plugins.state_dict()[k], trained[k].half().float()) for k in trained)
    assert not plugins.training and plugins.placement == summary["plugins"].placement
    for key in (
        "model_class",
        "hidden_size",
        "num_layers",
        "grid",
        "d_prime",
        "n_queries",
        "heads",
        "pruning_layers",
        "repair_layers",
        "source_map",
        "rho",
        "budget",
        "loss_weights",
        "alpha",
        "tau_eval",
        "theta",
        "delta",
        "steps",
        "seed",
        "vtprune_version",
        "base_model",
    ):
        assert key in config, key
    assert config["delta"] == summary["calibration"]["delta"] and config["budget"] == pytest.approx(64)
    assert model_signature(loaded.model) == {k: config[k] for k in ("model_class", "hidden_size", "num_layers")}
    # the message names only the fields that differ (issue 20: it used to list equal sizes as the difference)
    with pytest.raises(UnsupportedModelError, match=r"in checkpoint hidden size 32, this model hidden size 64; "):
        load_checkpoint(tmp_path, tiny_llava(layers=6))
    with pytest.raises(UnsupportedModelError, match="this model model class LlavaNextForConditionalGeneration; "):
        load_checkpoint(tmp_path, tiny_llava_next(layers=6, hidden=32, heads=2, kv_heads=2))
    with pytest.raises(UnsupportedModelError, match="in checkpoint decoder layers 6, this model decoder layers 4; "):
        load_checkpoint(tmp_path, tiny_llava(layers=4, hidden=32, heads=2, kv_heads=2))


def test_budget_feasibility_names_the_smallest_budget():
    with pytest.raises(BudgetError, match="19 tokens"):
        check_feasible(placement_for(32, 16 / 576), 16 / 576, 576)  # layer 1 runs all 576 tokens
    check_feasible(placement_for(3, 16 / 576), 16 / 576, 576)  # built-in model: the first pruner is at layer 0


def test_cli_train_rcp(setup, tmp_path, capsys):
    from vtprune.commands.rcp import add_parser

    model_dir, data, _ = setup
    parser = argparse.ArgumentParser(prog="vtprune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "train-rcp",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--budget",
            "16",
            "--out",
            str(tmp_path),
            "--steps",
            "1",
            "--batch",
            "1",
            "--grad-accum",
            "1",
            "--calib-n",
            "0",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    assert '"steps_done": 1' in capsys.readouterr().out
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["budget"] == pytest.approx(16) and config["pruning_layers"] == [0, 2, 5] and config["d_prime"] == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["train-rcp", "--model", "x", "--data", "y", "--out", "z", "--resume", "--fresh"])


def test_llava_next_training_smoke(setup, tmp_path):
    """LLaVA-NeXT through the same trainer: its own processor (tiles + image_sizes), newline rows not slots."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from vtprune.runner import Loaded
    from vtprune.testbed.tokenizer import CLIP_MEAN, CLIP_STD, build_tokenizer, vocabulary
    from vtprune.testing import tiny_llava_next

    _, data, _ = setup
    model = tiny_llava_next(layers=6)
    model.config.image_token_id = vocabulary()["<image>"]  # the testbed tokenizer's placeholder
    tok = build_tokenizer()
    image_proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    proc = LlavaNextProcessor(
        image_processor=image_proc,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    loaded = Loaded(model, "llava_next", tok, image_proc, proc, None)
    cfg = RCPTrainConfig(budget=0.25, steps=2, batch=2, grad_accum=1, d_prime=32, bottleneck=32, calib_n=2)
    summary = train("tiny-next", data, tmp_path, cfg, device="cpu", progress=False, loaded=loaded, log=lambda *_: None)
    assert summary["steps_done"] == 2 and summary["placement"]["pruning_layers"] == [1, 3, 5]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    plugins, config = load_checkpoint(tmp_path, model)
    assert config["model_class"] == "LlavaNextForConditionalGeneration" and config["rho"] == 0.25
