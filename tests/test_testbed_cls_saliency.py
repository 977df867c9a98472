"""Stage C of the testbed training: the [CLS] attention it trains is the signal the engine hands methods,
and only the class embedding changes."""

from __future__ import annotations

import torch
from families import SignalProbe

import vtprune
from vtprune.testbed.cls_saliency import cls_attention, informative_patches, saliency_stats, tune_cls_embedding
from vtprune.testbed.data import dense_batch
from vtprune.testbed.model import TINY, build_model
from vtprune.testbed.scenes import make_scene, render
from vtprune.testbed.tokenizer import build_processor, prompt


def test_cls_attention_is_the_engines_signal():
    model = build_model(TINY, seed=1).eval()
    processor = build_processor()
    images = [render(make_scene(4, i)) for i in range(2)]
    inputs = processor(images=images, text=[prompt("what number is in the box ?")] * 2, return_tensors="pt",
                       padding=True)
    SignalProbe.seen.clear()
    with vtprune.pruned(model, "test_signal_probe", 64), torch.no_grad():
        model(**inputs)
        ours = cls_attention(model, inputs["pixel_values"])
    assert ours.shape == (2, 576) and len(SignalProbe.seen) == 2
    for img, row in zip(SignalProbe.seen, ours, strict=True):
        assert (img.signals["cls_attention"] - row).abs().max() <= 1e-6


def test_tuning_moves_only_the_class_embedding_towards_informative_patches():
    model = build_model(TINY, seed=2).eval()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = tune_cls_embedding(model, steps=30, lr=0.1, seed=5, batch=4, eval_n=8, log=lambda _: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed == {"model.vision_tower.embeddings.class_embedding"}
    assert {p.requires_grad for p in model.parameters()} == {True}  # the flags are restored
    assert stats["after"]["mass"] > stats["before"]["mass"]
    assert set(stats["before"]) == {"mass", "precision", "recall_at_64", "feature_drift"}
    assert stats["before"]["feature_drift"] == 0.0
    # the reported "after" numbers are those of the model as it is now
    pv, labels = dense_batch(10001, 0, 8)
    assert saliency_stats(model, pv, informative_patches(labels))["mass"] == stats["after"]["mass"]


def test_saliency_stats_on_a_known_attention(monkeypatch):
    """precision / recall are computed on the rank order of the attention."""
    import vtprune.testbed.cls_saliency as cs

    probs = torch.zeros(1, 576)
    probs[0, [3, 7, 9]] = torch.tensor([0.5, 0.3, 0.1])  # ranks: 3, 7, 9, then ties at 0
    monkeypatch.setattr(cs, "cls_attention", lambda model, pv: probs)
    informative = torch.zeros(1, 576, dtype=torch.bool)
    informative[0, [3, 9, 100, 200]] = True
    s = cs.saliency_stats(None, torch.zeros(1), informative, top=3)
    assert s["mass"] == 0.6
    assert s["recall_at_3"] == 0.5  # 3 and 9 among the top 3, of 4 informative patches
    assert s["precision"] == 0.5  # top 4 (ties by index): 3, 7, 9, 0


def test_the_drift_penalty_keeps_the_features_closer_and_the_features_are_the_decoders():
    from vtprune.testbed.cls_saliency import cls_attention_and_features
    from vtprune.testbed.features import vision_features

    pv, _ = dense_batch(10001, 0, 2)
    model = build_model(TINY, seed=2).eval()
    with torch.no_grad():
        probs, feats = cls_attention_and_features(model, pv)
        torch.testing.assert_close(feats, vision_features(model, pv))  # what the decoder reads
        torch.testing.assert_close(probs, cls_attention(model, pv))
    drift = {}
    for weight in (0.0, 50.0):
        model = build_model(TINY, seed=2).eval()
        stats = tune_cls_embedding(model, steps=30, lr=0.1, seed=5, batch=4, eval_n=8, log=lambda _: None,
                                   drift_weight=weight)
        drift[weight] = stats["after"]["feature_drift"]
        assert stats["after"]["mass"] > stats["before"]["mass"]
    assert 0.0 < drift[50.0] < drift[0.0]
