"""`vtprune run` and `vtprune show` end to end, offline: the shipped `builtin:shapes-llava` (LLaVA-1.5) and tiny
random LLaVA-NeXT / Qwen2.5-VL checkpoints saved with a locally built tokenizer and PIL image processor.

`show`'s marked cells are checked against `vtprune.last_run(model)` through the engine's own layout
(`adapter.image_layout`: crop, row, col of every candidate), and against the PNG's pixels (kept cells
untouched, pruned cells dimmed, merged tokens dotted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from saved_models import save_tiny_families

import vtprune
from vtprune import runner, show
from vtprune.api import session_of
from vtprune.cli import main
from vtprune.loading import wrap_synthetic
from vtprune.testbed import builtin_names

torch.set_num_threads(1)

COLOUR = (180, 200, 220)  # uniform test image: kept cells keep it, pruned ones are dimmed
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """name -> (model id, prompt, image size (W, H), methods for show)."""
    root = tmp_path_factory.mktemp("run-show")
    save_tiny_families(root)
    dirs = {
        "llava_next": (str(root / "next"), "w5 w6 w7", (160, 100), "pool,visionzip,divprune,fastv@0.7"),
        "qwen2_5_vl": (str(root / "qwen"), "w5 w6 w7", (160, 100), "pool,visionzip,divprune,fastv@0.7"),
    }
    assert "shapes-llava" in builtin_names(), "builtin:shapes-llava is missing from vtprune/assets/ (shipped)"
    dirs["llava"] = ("builtin:shapes-llava", "what colour is the cross ?", (400, 300), "pool,visionzip,fastv@400")
    return dirs


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {name: runner.load(spec[0]) for name, spec in model_dirs.items()}


def _image(size, colour=COLOUR) -> Image.Image:
    return Image.new("RGB", size, colour)


def _family(model_dirs, name):
    return model_dirs[name]


FAMILIES = ["llava", "llava_next", "qwen2_5_vl"]


# --- run --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_run_cli_prints_answer_counts_flops_and_timing(model_dirs, name, tmp_path, capsys):
    model_id, prompt, size, _ = _family(model_dirs, name)
    image = tmp_path / "in.png"
    _image(size).save(image)
    out = tmp_path / "run.json"
    budget = "64" if name == "llava" else "0.3"
    args = ["run", "--model", model_id, "--image", str(image), "--prompt", prompt, "--method", "pool"]
    assert main([*args, "--budget", budget, "--max-new-tokens", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "answer" in text and "retained" in text and "layer-averaged" in text and "unpruned" in text
    assert res["answer"] in text
    n = res["n_visual"]
    k = 64 if name == "llava" else round(0.3 * n)
    assert res["retained_tokens"] <= k + 1 and res["layer_avg_tokens"] == res["retained_tokens"] < n
    assert str(res["retained_tokens"]) in text
    for conv in ("exact", "fastv", "swiglu"):
        assert 0 < res["flops"][conv] < res["flops_unpruned"][conv]
    assert res["prefill_ms"] > 0 and res["total_ms"] >= res["prefill_ms"]
    assert [len(e["keep_idx"]) for e in res["events"]] == [res["retained_tokens"]]


def test_run_one_matches_last_run_and_chat_template(model_dirs, loaded):
    """Counts and kept indices of `run_one` are `last_run`'s; the checkpoints' chat templates are used."""
    _, prompt, size, _ = model_dirs["qwen2_5_vl"]
    lq = loaded["qwen2_5_vl"]
    assert runner.prompt_text(lq, prompt) == "<s> <|vision_start|><|image_pad|><|vision_end|> w5 w6 w7 w9"
    assert runner.prompt_text(loaded["llava_next"], prompt) == "w4 <image> w5 w6 w7 w8"
    res = runner.run_one(lq, _image(size), prompt, "fastv", 0.7, max_new_tokens=2, keep_patched=True)
    try:
        rec = vtprune.last_run(lq.model)
        s = rec.samples[0]
        assert (res["n_visual"], res["retained_tokens"], res["layer_avg_tokens"]) == (
            s.n_visual,
            s.retained_tokens,
            s.layer_avg_tokens,
        )
        assert res["retained_tokens"] == s.n_visual > s.visual_per_layer[-1]  # FastV cuts inside the LLM
        assert torch.equal(res["events"][0]["keep_idx"], s.events[0].keep_idx)
        assert res["flops"] == pytest.approx(rec.flops) and res["new_tokens"] == 2
    finally:
        vtprune.remove(lq.model)


def test_placeholder_tokenizer_path_runs(loaded):
    """`arch:` models get a placeholder tokenizer (tested here on a tiny NeXT model instead of a 7B build)."""
    model = loaded["llava_next"].model
    lp = wrap_synthetic(model)
    assert "placeholder tokenizer" in lp.note
    assert lp.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    res = runner.run_one(lp, _image((160, 100)), "what is this ?", "divprune", 0.5, max_new_tokens=2)
    assert res["retained_tokens"] == 32 and res["note"] == lp.note and res["new_tokens"] == 2


@pytest.mark.slow
def test_run_arch_model_with_placeholder_tokenizer(tmp_path, capsys):
    image = tmp_path / "in.png"
    _image((336, 336)).save(image)
    args = ["run", "--model", "arch:llava-1.5-7b", "--layers", "1", "--dtype", "bfloat16", "--image", str(image)]
    assert main([*args, "--prompt", "what ?", "--method", "pool", "--budget", "64", "--max-new-tokens", "1"]) == 0
    text = capsys.readouterr().out
    assert "placeholder tokenizer" in text and "answer:" in text


# --- show -------------------------------------------------------------------------------------------------
def _expected_cells(model, events) -> list[list[tuple[int, int, int]]]:
    """The engine's own layout of the last prefill: keep_idx -> (crop, row, col) per event."""
    adapter = session_of(model).adapter
    n = vtprune.last_run(model).samples[0].n_visual
    _, coords, crop = adapter.image_layout(0, n)
    return [[(int(crop[i]), int(coords[i, 0]), int(coords[i, 1])) for i in ev.keep_idx] for ev in events]


def _close(pixel, colour, tol=3) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_show_cells_equal_last_run_and_png_pixels(model_dirs, loaded, name, tmp_path):
    _, prompt, size, methods = _family(model_dirs, name)
    lm = loaded[name]
    image = _image(size)
    out = tmp_path / "show.png"
    budget = 64 if name == "llava" else 0.3
    result = show.show(lm, image, prompt, methods, budget, out, max_new_tokens=1)
    png = Image.open(out)
    png.load()
    assert png.format == "PNG" and png.mode == "RGB" and png.size == result.image.size
    names = [m.split("@")[0] for m in methods.split(",")]
    assert [r["method"] for r in result.results] == names and all("error" not in r for r in result.results)
    assert png.width > len(names) * 200  # side by side
    assert {p.method for p in result.panels} == set(names)
    inputs = runner.build_inputs(lm, image, prompt)
    pixels = np.asarray(png)
    dim = show.dim_colour(COLOUR)
    for method, b in show.parse_methods(methods, budget):
        panels = [p for p in result.panels if p.method == method]
        vtprune.apply(lm.model, method, b)
        try:
            with torch.inference_mode():
                lm.model(**inputs)
            events = vtprune.last_run(lm.model).samples[0].events
            expected = _expected_cells(lm.model, events)
        finally:
            vtprune.remove(lm.model)
        assert [p.cells for p in panels] == expected, method
        assert [p.stage for p in panels] == [ev.stage for ev in events]
        for p in panels:
            assert set(p.boxes) == set(result.layout.all_cells()) and len(set(p.cells)) == len(p.cells)
            kept, merged = set(p.cells), set(p.merged_cells)
            assert merged <= kept and (bool(merged) == (method in ("pool", "visionzip")))
            assert bool(p.windows) == (method == "pool") and not (p.covered & kept)  # pool: windows, not faded
            for cell in p.boxes:
                x, y = p.centre(cell)
                px = pixels[y, x]
                want = show.MERGED if cell in merged else COLOUR if cell in kept | p.covered else dim
                assert _close(px, want), (method, cell, tuple(px), want)


def test_show_merged_cells_are_the_merges(loaded):
    """VisionZip: the dotted cells are its contextual (merged) tokens; pool: every kept token is a merge."""
    lm = loaded["llava_next"]
    res = show.show(lm, _image((160, 100)), "w5", "visionzip,pool", 0.5, None, max_new_tokens=1)
    vz, pool = res.panels
    merged_idx = res.results[0]["events"][0]["merged_idx"]
    assert 0 < len(vz.merged_cells) == len(merged_idx) < len(vz.cells)
    assert vz.merged_cells == res.layout.cells(merged_idx)
    assert pool.merged_cells == pool.cells


def test_show_cli_writes_png_and_reports_infeasible_methods(model_dirs, tmp_path, capsys):
    model_id, prompt, size, _ = model_dirs["qwen2_5_vl"]
    image = tmp_path / "in.png"
    _image(size).save(image)
    args = ["show", "--model", model_id, "--image", str(image), "--prompt", prompt, "--budget", "0.3"]
    one, three = tmp_path / "one.png", tmp_path / "three.png"
    assert main([*args, "--methods", "divprune", "--out", str(one)]) == 0
    assert main([*args, "--methods", "divprune,pool@0.5,fastv", "--option", "fastv.k=3", "--out", str(three)]) == 1
    out, err = capsys.readouterr()
    # FastV at n̄ = 0.3 N cut at layer 3 of 4 is infeasible: its column says why, the status is 1 (partial)
    assert f"picture: {three}" in err and "not run" in out and "fastv @ 0.3" in err
    assert main([*args, "--methods", "divprune", "--option", "k=3", "--out", str(one)]) == 2
    assert "none of the methods ['divprune'] has it" in capsys.readouterr().err
    a, b = Image.open(one), Image.open(three)
    # side by side: three columns, three times as wide (the header may wrap to more lines on the narrow one)
    assert a.format == b.format == "PNG" and b.height <= a.height and b.width > 2.5 * a.width


def test_layout_next_tile_area_matches_the_model():
    """The NeXT tile grid show draws equals the model's packed (unpadded) feature grid for odd image sizes."""
    from types import SimpleNamespace

    from vtprune.loading.arch import arch_config
    from vtprune.models.display import anyres_tile_geometry
    from vtprune.models.llava_next import LlavaNextAdapter

    cfg = arch_config("llava-next-7b")
    model = SimpleNamespace(config=cfg)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    for h, w in [(300, 500), (1000, 200), (799, 1203), (336, 336)]:
        geo = anyres_tile_geometry(cfg, (h, w))
        nph, npw = get_anyres_image_grid_shape([h, w], cfg.image_grid_pinpoints, 336)
        assert (geo["rows"], geo["cols"]) == tuple(unpad_image(torch.empty(1, nph * 24, npw * 24), [h, w]).shape[1:])
        inputs = {"image_sizes": torch.tensor([[h, w]])}
        layout = LlavaNextAdapter(model).display_layout(_image((w, h)), inputs, None)
        boxes = [layout.box(1, r, c) for r in range(geo["rows"]) for c in range(geo["cols"])]
        cell = geo["cell_px"] * w / geo["resized"][0]
        assert min(b[0] for b in boxes) < cell and max(b[2] for b in boxes) > w - cell
        assert min(b[1] for b in boxes) < cell and max(b[3] for b in boxes) > h - cell


def test_methods_command_lists_every_registered_method(capsys):
    from vtprune.cli import main

    assert main(["methods", "--format", "json"]) == 0
    listed = {row["name"] for row in json.loads(capsys.readouterr().out)["rows"]}
    assert listed == set(vtprune.methods())
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in listed) and max(len(line) for line in text.splitlines()) <= 80
