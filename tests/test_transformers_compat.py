"""Regression tests for transformers releases that move internals (issue 19: 5.24 renamed the forward keyword
`past_key_values` to `cache`, and every decode step was taken for a new prefill).  They run on every version
CI covers (the newest, and the oldest supported one in `.ci/oldest-transformers.sh`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from families import family
from packaging.version import Version
from test_rcp_inference import _plugins, _save
from transformers import StaticCache

import vtprune
from vtprune import hf_compat as hf

PRE_LLM = ("random", "pool", "divprune", "visionzip")
IN_LLM = ("fastv", "pdrop", "sparsevlm", "vitcop")
OPTIONS = {"sparsevlm": {"schedule": "matched"}}  # its reference table has rows for 64..192 of 576 only
N = 576  # visual tokens per image of the tiny LLaVA
BUDGET = 260  # layer-averaged: feasible for every in-LLM schedule on its 6 layers


def _record_summary(rec) -> list[tuple]:
    return [
        (s.n_visual, s.n_text, tuple(s.visual_per_layer), tuple(tuple(e.keep_idx.tolist()) for e in s.events))
        for s in rec.samples
    ]


def test_installed_version_is_in_the_tested_range():
    assert hf.version_supported(), f"transformers {hf.VERSION} is outside {hf.TESTED_RANGE}"
    assert hf.CACHE_KWARG == ("cache" if hf.VERSION >= Version("5.24") else "past_key_values")


def test_untested_version_warns_once(monkeypatch):
    monkeypatch.setattr(hf, "VERSION", Version("6.0.0"))
    monkeypatch.setattr(hf, "_warned", False)
    with pytest.warns(hf.UntestedTransformersWarning, match=r"tested with transformers >=5\.18\.0,<5\.26\.0"):
        hf.check_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.check_version()  # once only
    assert hf.version_supported(Version("5.24.0.dev0")) is True
    assert hf.version_supported(Version("5.25.0")) is True
    assert hf.version_supported(Version("5.26.0")) is False
    assert hf.version_supported(Version("5.17.0")) is False


@pytest.mark.parametrize("method", PRE_LLM + IN_LLM)
def test_generate_records_the_prefill_not_a_decode_step(method):
    """After generate(), last_run equals the record of the same prompt's plain forward (counts and kept indices)."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with vtprune.pruned(model, method, BUDGET, **OPTIONS.get(method, {})), torch.no_grad():
        model(**inputs)
        forward = _record_summary(vtprune.last_run(model))
        model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[model.config.image_token_id])
        after_generate = _record_summary(vtprune.last_run(model))
    assert forward[0][0] == N and forward[0][2][0] <= N
    assert any(v < N for v in forward[0][2]), "the method pruned nothing"
    assert after_generate == forward


def test_manual_decode_step_is_not_recorded_as_a_prefill():
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with vtprune.pruned(model, "fastv", BUDGET), torch.no_grad():
        out = model(**inputs, use_cache=True)
        prefill = _record_summary(vtprune.last_run(model))
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        model(input_ids=token, attention_mask=mask, use_cache=True, **{hf.CACHE_KWARG: hf.output_cache(out)})
        assert _record_summary(vtprune.last_run(model)) == prefill


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_generate_on_a_left_padded_batch(method):
    """A left-padded batch of two equals each sample generated alone (the 5.24 failure was a size mismatch)."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    assert bool((inputs["attention_mask"] == 0).any()), "the batch is not padded"
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id])
    with vtprune.pruned(model, method, BUDGET, **OPTIONS.get(method, {})), torch.no_grad():
        batch = model.generate(**inputs, **kw)
        width = inputs["input_ids"].shape[1]
        for b in range(2):
            alone = fam.alone(inputs, b)
            single = model.generate(**alone, **kw)
            assert torch.equal(batch[b, width:], single[0, alone["input_ids"].shape[1] :])


def test_rcp_repair_runs_on_every_generated_token(tmp_path, monkeypatch):
    plugins = _plugins("llava", 1 / 3)
    path = _save(plugins, "llava", 1 / 3, tmp_path / "ckpt")
    model, inputs = family("llava").models["sdpa"], family("llava").batches[1]
    steps = 4
    with vtprune.pruned(model, "rcp", 1 / 3, checkpoint=path), torch.no_grad():
        method = vtprune.session_of(model).method
        calls: list[tuple[int, int]] = []
        stock = method.repair

        def counting(layer, x, memos):
            calls.append((layer, int(x.shape[0])))
            return stock(layer, x, memos)

        monkeypatch.setattr(method, "repair", counting)
        model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=[model.config.image_token_id])
        repair_layers = method.repair_layers()
    assert len(repair_layers) >= 1
    # one call per repair layer for the prefill's last row, then one per layer per decode step
    assert len(calls) == len(repair_layers) * steps
    assert all(rows == 1 for _, rows in calls)


@pytest.mark.parametrize("keyword", hf.CACHE_KWARGS)
def test_static_cache_refused_under_either_keyword(keyword):
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[1]
    cache = StaticCache(config=model.config.text_config, max_cache_len=200)
    with vtprune.pruned(model, "fastv", BUDGET):
        with pytest.raises(vtprune.UnsupportedInputError, match=f"static .*{keyword}="):
            model.generate(**inputs, max_new_tokens=2, **{keyword: cache})


@pytest.mark.parametrize("method", ("pool", "fastv"))
def test_vtprune_triggers_no_transformers_deprecation_warning(method):
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module="transformers")
        with vtprune.pruned(model, method, BUDGET, **OPTIONS.get(method, {})), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[model.config.image_token_id])
