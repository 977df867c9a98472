"""`vtprune bench` and the bundled architectures (random weights, real sizes, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny

from vtprune.cli import main
from vtprune.loading.arch import ARCH_NAMES, arch_config, build_arch, full_dims
from vtprune.measurement.flops import LLM_PRESETS, LLMDims, prefill_flops

ROW_FIELDS = {
    "method",
    "budget",
    "retained_tokens",
    "layer_avg_tokens",
    "prefill_ms",
    "prefill_ms_unpruned",
    "speedup_prefill",
    "flops_bound",
    "selection_ms",
    "decode_ms_per_token",
    "peak_mem_bytes",
    "kv_bytes",
    "device",
    "dtype",
}


# text-model widths of the 2026 families from their public model configs (no spec constants exist for them):
# (layers, hidden, intermediate, heads, kv heads, head_dim)
PUBLISHED_LLM = {
    "qwen3-vl-8b": (36, 4096, 12288, 32, 8, 128),
    "llava-onevision-7b": (28, 3584, 18944, 28, 4, 128),  # Qwen2-7B
    "gemma-3-4b": (34, 2560, 10240, 8, 4, 256),
    "gemma-3-12b": (48, 3840, 15360, 16, 8, 256),
    "internvl3-8b": (28, 3584, 18944, 28, 4, 128),  # Qwen2.5-7B
}


def test_every_bundled_config_has_reference_widths():
    assert set(ARCH_NAMES) == set(LLM_PRESETS) | set(PUBLISHED_LLM)


@pytest.mark.parametrize("name", sorted(PUBLISHED_LLM))
def test_bundled_2026_configs_have_the_published_widths(name):
    assert full_dims(name) == LLMDims(*PUBLISHED_LLM[name])
    assert arch_config(name, layers=2).get_text_config().num_hidden_layers == 2


@pytest.mark.parametrize("name", sorted(set(ARCH_NAMES) & set(LLM_PRESETS)))
def test_bundled_configs_match_the_spec_constants(name):
    assert full_dims(name) == LLM_PRESETS[name]
    cfg = arch_config(name, layers=3)
    assert cfg.text_config.num_hidden_layers == 3
    if name.startswith("qwen"):
        assert cfg.image_token_id == 151655 and cfg.video_token_id == 151656
        assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)
        vc = cfg.vision_config
        assert (vc.depth, vc.hidden_size, vc.num_heads, vc.intermediate_size) == (32, 1280, 16, 3420)
        assert list(vc.fullatt_block_indexes) == [7, 15, 23, 31] and vc.window_size == 112
        assert vc.out_hidden_size == cfg.text_config.hidden_size
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert cfg.text_config.rope_parameters["rope_theta"] == 1e6
        assert cfg.text_config.vocab_size == (152064 if name.endswith("7b") else 151936)
    else:
        assert cfg.image_token_id == 32000 and cfg.text_config.vocab_size == 32064
        assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14


def test_build_arch_llava_7b_real_widths_one_layer():
    model = build_arch("llava-1.5-7b", layers=1, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 789_542_912  # CLIP-L/336 + projector + 1 Vicuna layer + head
    lm = model.model.language_model
    assert len(lm.layers) == 1 and lm.config.hidden_size == 4096
    w = lm.layers[0].mlp.up_proj.weight
    assert w.shape == (11008, 4096) and w.dtype == torch.bfloat16
    assert abs(w.float().std().item() - 0.02) < 1e-3 and lm.norm.weight.float().eq(1).all()
    assert lm.rotary_emb.inv_freq.dtype == torch.float32 and lm.rotary_emb.inv_freq[0] == 1.0
    assert torch.equal(model.model.vision_tower.embeddings.position_ids[0], torch.arange(577))
    assert not any(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--model", "tiny:llava", "--layers", "4", "--method", "none,pool,fastv,random",
            "--budget", "192,64", "--budget-mode", "retained", "--repeats", "2", "--new-tokens", "3",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_json_has_every_field(bench_json):
    rows = bench_json["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("none", "all"),
        ("pool", 192),
        ("pool", 64),
        ("fastv", 192),
        ("fastv", 64),
        ("random", 192),
        ("random", 64),
    ]
    for r in rows:
        assert "error" not in r, r
        missing = ROW_FIELDS - set(r)
        assert not missing, (r["method"], missing)
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["repeats"] == 2
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["kv_bytes"] == r["kv_bytes_analytic"]  # batch 1: no padding rows
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by[("pool", 64)]["retained_tokens"] == 64 and by[("fastv", 64)]["retained_tokens"] == 576
    assert by[("fastv", 64)]["visual_per_layer"] == [576, 576, 64, 64]
    assert by[("none", "all")]["selection_ms"] == 0 and by[("random", 64)]["selection_ms"] > 0


def test_bench_flops_bound_is_the_analytic_ratio(bench_json):
    dims = LLMDims.from_config(tiny("llava", layers=4).config.text_config)
    base = bench_json["rows"][0]
    full = prefill_flops([576] * 4, base["n_text"], dims, "exact")
    for r in bench_json["rows"][1:]:
        pruned = prefill_flops(r["visual_per_layer"], r["n_text"], dims, "exact")
        assert r["flops_bound"] == pytest.approx(full / pruned)
        assert r["speedup_prefill"] == pytest.approx(r["prefill_ms_unpruned"] / r["prefill_ms"])


def test_bench_runs_text_reading_methods_on_models_without_a_tokenizer(tmp_path):
    """`tiny:`/`arch:` models have no tokenizer: the bench's id-word stand-in lets ResPrune read its nouns."""
    from vtprune.bench.core import IdWordTokenizer

    tok = IdWordTokenizer()
    assert tok.decode([5, 17]) == "w5 w17" and tok(" w17")["input_ids"] == [17] and tok("the")["input_ids"] == []
    out = tmp_path / "b.json"
    main(["bench", "--model", "tiny:llava", "--method", "resprune", "--budget", "64", "--repeats", "1",
          "--warmup", "0", "--new-tokens", "1", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][1]
    assert "error" not in row, row
    assert row["retained_tokens"] == 64 and row["selection_ms"] > 0
