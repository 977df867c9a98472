"""`PruningMethod.select_batch`: the engine asks for all images of a stage in one call; the batched overrides
(ResPrune, DivPrune, CDPruner: one greedy loop for the batch on accelerators) must give each image the plan
`select` gives it alone. Their accelerator path is forced on CPU here with `batch_on_cpu`."""

from __future__ import annotations

import pytest
import torch
from factories import image_tokens
from families import family
from oracles import generate_logits

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import KeepPlan, PruningMethod, Stage, build_method
from vtprune.record import SelectCall

BATCHED = [
    ("resprune", {"alpha": 0.0}),
    ("resprune", {}),  # text relevance from noun embeddings
    ("divprune", {}),
    ("cdpruner", {"relevance": "llm"}),
    ("vispruner", {}),
]
KS = [10, 7, 20, 10]


def _images(d: int = 16, rank: int | None = None) -> list:
    """Four images, three sizes (one with two vision views), with the signals the methods read."""
    out = []
    for seed, n in ((0, 40), (1, 33), (2, 48), (3, 40)):
        gen = torch.Generator().manual_seed(seed)
        feats = torch.randn(n, d, generator=gen)
        if rank is not None:  # rank-deficient features: the span is exhausted before k (the fill rules)
            feats = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
        signals = {"noun_embeddings": torch.randn(2, d, generator=gen),
                   "question_embeddings": torch.randn(5, d, generator=gen),
                   "cls_attention": torch.rand(n, generator=gen),
                   "vision_features": torch.randn(n, 12, generator=gen)}  # fmt: skip
        extra = {"tile": (torch.arange(n) >= n // 2).long()} if seed == 2 else {}
        out.append(image_tokens(grids=((8, 8),), n=n, feats=feats, signals=signals, seed=seed,
                                question="what colour is the square?", **extra))  # fmt: skip
    return out


def _method(name: str, options: dict) -> PruningMethod:
    method = build_method(name, options)
    method.available_signals = frozenset({"question_embeddings", "noun_embeddings", "question_text"})
    method.bind(32)
    method.batch_on_cpu = True
    return method


def test_vispruner_batches_on_accelerators_only_when_asked():
    """Its batched kept sets differed from the loop's on an H200 before the per-crop similarities: opt-in."""
    assert build_method("vispruner", {}).batch_on_accelerators is False


@pytest.mark.parametrize("name,options", BATCHED)
@pytest.mark.parametrize("rank", [None, 3])
def test_batched_plans_equal_each_image_alone(name, options, rank):
    method = _method(name, options)
    images, ks = _images(rank=rank), KS
    batched = method.select_batch(0, images, ks)
    assert len(batched) == len(images)
    for image, k, plan in zip(_images(rank=rank), ks, batched, strict=True):
        alone = method.select(0, image, k)
        assert plan.keep_idx.dtype == torch.long and plan.keep_idx.numel() == k
        assert torch.equal(plan.keep_idx, alone.keep_idx), (name, k)


@pytest.mark.parametrize("name,options", BATCHED)
def test_cpu_default_is_the_per_image_loop(name, options, monkeypatch):
    method = _method(name, options)
    method.batch_on_cpu = False
    calls = []
    original = type(method).select
    monkeypatch.setattr(type(method), "select", lambda self, s, im, k: calls.append(k) or original(self, s, im, k))
    method.select_batch(0, _images(), KS)
    assert calls == KS


@pytest.mark.parametrize("name", ["divprune", "resprune"])
def test_engine_batch_of_two_equals_each_alone_batched_path(name, monkeypatch):
    """The engine's single select_batch call on a batch of two (accelerator path forced) keeps, per sample, the
    tokens of that sample alone, and each image records half of the call's time."""
    cls = type(build_method(name, {}))
    monkeypatch.setattr(cls, "batch_on_cpu", True)
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    options = {"alpha": 0.0} if name == "resprune" else {}
    vtprune.apply(model, name, 64, **options)
    try:
        tokens, logits = generate_logits(model, inputs, 2)
        run = vtprune.last_run(model)
        kept = [s.events[-1].keep_idx for s in run.samples]
        assert [c.share for c in run.selections] == [0.5, 0.5]
        assert run.selections[0].ms == run.selections[1].ms
        for b in range(2):
            t1, l1 = generate_logits(model, fam.alone(inputs, b), 2)
            assert torch.equal(vtprune.last_run(model).samples[0].events[-1].keep_idx, kept[b])
            assert [c.share for c in vtprune.last_run(model).selections] == [1.0]
            assert (l1[0] - logits[b]).abs().max() <= 1e-4
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)


class _OnePlanShort(PruningMethod):
    name = "one_plan_short"

    def stages(self):
        return (Stage("pre_llm"),)

    def select(self, stage_index, image, k):
        return KeepPlan(torch.arange(k))

    def select_batch(self, stage_index, images, ks):
        return super().select_batch(stage_index, images, ks)[:-1]


def test_select_batch_with_too_few_plans_is_refused(models, batches):
    model, inputs = models["sdpa"], batches[2]
    stock = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vtprune.apply(model, _OnePlanShort(), 64)
    try:
        with pytest.raises(VtpruneError, match="select_batch returned 1 plans for 2 images"):
            model(**inputs)
    finally:
        vtprune.remove(model)
    assert all(torch.equal(v, stock[k]) for k, v in model.state_dict().items())


def test_split_call_shares_sum_to_the_call():
    call = SelectCall.start(0, torch.device("cpu"))
    call.stop()
    parts = call.split(4)
    assert [p.share for p in parts] == [0.25] * 4
    assert sum(p.ms for p in parts) == pytest.approx(call.ms)
