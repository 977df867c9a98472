"""Bad input gets a clear error naming the problem and leaves the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import vtprune
from vtprune import hf_compat as hf
from vtprune.testing import llava_inputs


def _untouched(model):
    return (
        not model._forward_pre_hooks
        and not model._forward_hooks
        and "generate" not in model.__dict__
        and vtprune.session_of(model) is None
        and all(not lay._forward_pre_hooks for lay in model.model.language_model.layers)
    )


@pytest.mark.parametrize(
    "budget,needle",
    [
        (0, "positive"),
        (-5, "positive"),
        (math.nan, "finite"),
        (float("inf"), "finite"),
        ("64", "int"),
        (True, "int"),
        (1.5, "(0, 1)"),
        (None, "int"),
    ],
)
def test_bad_budget(models, budget, needle):
    model = models["sdpa"]
    with pytest.raises(vtprune.BudgetError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        vtprune.apply(model, "random", budget)
    assert _untouched(model)


def test_bad_budget_mode_and_positions(models):
    model = models["sdpa"]
    with pytest.raises(vtprune.BudgetError, match="budget_mode"):
        vtprune.apply(model, "random", 64, budget_mode="average")
    with pytest.raises(vtprune.VtpruneError, match="positions"):
        vtprune.apply(model, "random", 64, positions="shift")
    assert _untouched(model)


def test_infeasible_layer_average_names_smallest_budget(models):
    model = models["sdpa"]
    with pytest.raises(vtprune.BudgetError, match="smallest feasible budget is 193"):
        vtprune.apply(model, "fastv", 64)
    assert _untouched(model)


def test_unknown_method_lists_known(models):
    with pytest.raises(vtprune.UnknownMethodError, match="fastv.*none.*pool.*random"):
        vtprune.apply(models["sdpa"], "tome", 64)
    with pytest.raises(vtprune.VtpruneError, match="no option"):
        vtprune.apply(models["sdpa"], "fastv", 200, alpha=0.5)
    with pytest.raises(vtprune.VtpruneError, match="llm:1 .. llm:5"):
        vtprune.apply(models["sdpa"], "fastv", 200, k=6)
    assert _untouched(models["sdpa"])


def test_unsupported_model_lists_supported():
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(vtprune.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vtprune.apply(llm, "random", 64)


def test_double_apply_and_remove_unpatched(models):
    model = models["sdpa"]
    with vtprune.pruned(model, "random", 64):
        with pytest.raises(vtprune.VtpruneError, match="already patched"):
            vtprune.apply(model, "pool", 64)
    with pytest.raises(vtprune.VtpruneError, match="not patched"):
        vtprune.remove(model)


def test_compiled_model_refused(models):
    compiled = torch.compile(models["sdpa"])
    with pytest.raises(vtprune.UnsupportedInputError, match="compile"):
        vtprune.apply(compiled, "fastv", 200)


def test_static_cache_and_chunked_prefill_refused(models, batches):
    model, inputs = models["sdpa"], batches[1]
    with vtprune.pruned(model, "fastv", 200):
        with pytest.raises(vtprune.UnsupportedInputError, match="cache_implementation"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(vtprune.UnsupportedInputError, match="chunked prefill"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=64)
        cache = StaticCache(config=model.config.text_config, max_cache_len=700)
        with pytest.raises(vtprune.UnsupportedInputError, match="static"):
            model(**inputs, **{hf.CACHE_KWARG: cache})


def test_missing_image_and_mismatched_placeholders(models, batches):
    model, inputs = models["sdpa"], batches[1]
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with vtprune.pruned(model, "random", 64):
        with pytest.raises(vtprune.UnsupportedInputError, match="missing image"):
            model(**no_pixels)
        short = dict(inputs)
        short["input_ids"] = inputs["input_ids"][:, 10:]
        short["attention_mask"] = inputs["attention_mask"][:, 10:]
        with pytest.raises(vtprune.UnsupportedInputError, match="not a multiple"):
            model(**short)
        with pytest.raises(vtprune.UnsupportedInputError, match="input_ids"):
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_prompt_without_image_runs_unpruned(models):
    model = models["sdpa"]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with vtprune.pruned(model, "fastv", 200):
        with torch.no_grad():
            out = model(input_ids=ids).logits
        rec = vtprune.last_run(model)
    assert torch.equal(out, ref)
    assert rec.samples[0].n_visual == 0 and rec.sequence_index is None


def test_several_images_pruned_per_image(models):
    """Two images in one prompt: the budget is split in proportion to N (32 + 32 of 64)."""
    model = models["sdpa"]
    inputs = llava_inputs(model, [([1, 5], [7, 8, 9])], images=2, seed=3)
    with vtprune.pruned(model, "random", 64):
        with torch.no_grad():
            model(**inputs)
        sample = vtprune.last_run(model).samples[0]
    kept = sample.events[0].keep_idx
    assert sample.n_visual == 1152 and sample.image_offsets == [0, 576, 1152]
    assert int((kept < 576).sum()) == 32 and int((kept >= 576).sum()) == 32
    assert sample.retained_tokens == 64


def test_manual_decode_loop_continues_pruned_cache(models, batches):
    """A user-written decode loop (forward with the cache) equals generate()."""
    model, inputs = models["sdpa"], batches[2]
    with vtprune.pruned(model, "fastv", 200):
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[250])
            out = model(**inputs)
            cache, mask = hf.output_cache(out), inputs["attention_mask"]
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [tok]
            for _ in range(2):
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                out = model(input_ids=tok, attention_mask=mask, **{hf.CACHE_KWARG: cache})
                logits = out.logits[:, -1]
                logits[:, 250] = -float("inf")
                tok = logits.argmax(-1, keepdim=True)
                toks.append(tok)
    assert torch.equal(torch.cat(toks, 1), ref[:, -3:])


def test_decode_with_new_image_refused(models, batches):
    model, inputs = models["sdpa"], batches[1]
    with vtprune.pruned(model, "fastv", 200):
        with torch.no_grad():
            out = model(**inputs)
        with pytest.raises(vtprune.UnsupportedInputError, match="new image"):
            model(input_ids=torch.tensor([[250]]), **{hf.CACHE_KWARG: hf.output_cache(out)})
