"""The stock-equivalent column of `vtprune bench` and the GPU script's tiny CPU mode (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scripts import benchmark_script
from vtprune import testing
from vtprune.api import session_of
from vtprune.bench.core import StockEquivalent, layer_lengths, length_segments

ROOT = Path(__file__).resolve().parents[1]


def test_length_segments():
    assert length_segments([640, 640, 256, 256, 256, 100]) == [(0, 2, 640), (2, 5, 256), (5, 6, 100)]
    assert length_segments([128] * 4) == [(0, 4, 128)]


def test_layer_lengths_is_the_padded_batch_length_per_layer():
    class S:
        def __init__(self, n_text, per_layer):
            self.n_text, self.visual_per_layer = n_text, per_layer

    class R:
        samples = [S(10, [100, 50, 50]), S(12, [90, 60, 40])]

    assert layer_lengths(R()) == [110, 72, 60]


def test_stock_equivalent_runs_each_layer_at_its_length_without_vtprune():
    model = testing.tiny_llava(layers=4)
    lm = model.model.language_model
    layers = lm.layers
    seen: list[tuple[int, int]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.append((i, a[0].shape[1])), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        stock = StockEquivalent(lm, [640, 640, 208, 208], batch=2)
        stock()
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(0, 640), (1, 640), (2, 208), (3, 208)]
    assert lm.layers is layers and session_of(model) is None


def _script(name: str):
    """A script of benchmarks/ imported as a module."""
    return benchmark_script(name)


def test_gpu_script_tiny_mode_runs_every_stage_with_the_stock_column(tmp_path):
    threads = torch.get_num_threads()
    try:
        data = _script("gpu_bench").main(["--tiny", "--out", str(tmp_path)])  # sets 1 torch thread, as every CPU bench
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert len(saved["stages"]) == len(data["stages"]) == 4
    assert [s["model"] for s in saved["stages"]] == ["tiny:llava", "tiny:llava", "tiny:llava-next", "tiny:qwen2.5-vl"]
    assert [s["batch"] for s in saved["stages"]][:2] == [1, 2]
    timed = 0
    for stage in saved["stages"]:
        assert not stage.get("skipped")
        for run in stage["runs"]:
            assert run["rows"][0]["method"] == "none"
            for row in run["rows"]:
                if row.get("error"):
                    continue
                timed += 1
                for key in ("prefill_ms", "forward_prefill_ms", "decode_ms_per_token", "kv_bytes", "vs_stock"):
                    assert row[key] is not None and row[key] > 0, key
                assert row["layer_lengths"][0] >= row["layer_lengths"][-1]
    assert timed >= 6
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "÷ stock" in md and "tiny:qwen2.5-vl" in md


def test_gpu_script_stage_filter_runs_only_the_named_stages(tmp_path):
    threads = torch.get_num_threads()
    try:
        data = _script("gpu_bench").main(["--tiny", "--out", str(tmp_path), "--stages", "qwen"])
    finally:
        torch.set_num_threads(threads)
    assert [s["model"] for s in data["stages"]] == ["tiny:qwen2.5-vl"]


def test_gpu_profile_script_tiny_mode(tmp_path):
    data = _script("profile_gpu").main(["--tiny", "--batch", "2", "--methods", "fastv", "--out", str(tmp_path),
                                        "--warmup", "1"])  # fmt: skip
    assert list(data["runs"]) == ["none", "fastv"]
    for run in data["runs"].values():
        assert run["wall_ms"] > 0 and run["top_host"]
    saved = json.loads((tmp_path / "profile_gpu.json").read_text())
    assert set(saved["runs"]) == {"none", "fastv"}
    assert "| fastv |" in (tmp_path / "profile_gpu.md").read_text()


def test_select_batch_timing_script_on_cpu_finds_identical_plans():
    rows = _script("select_batch_time").main(["--device", "cpu", "--batch", "3", "--n", "36", "--dim", "16",
                                              "--budgets", "8", "--repeats", "1"])  # fmt: skip
    assert [r["method"] for r in rows] == ["resprune", "divprune", "cdpruner", "vispruner"]
    assert all(r["identical_keep_sets"] and r["loop_ms"] > 0 and r["batched_ms"] > 0 for r in rows)
