"""The training-only attention target for fetching a relation's second object (`fetch_attention.py`): its per-patch
target, the loss against the model's own eager attention, and a trainer run that uses it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import tiny_v3_train_config, train_restoring_threads

from vtprune.testbed import data_v3, questions_v3
from vtprune.testbed.answer_readout import answer_positions
from vtprune.testbed.data import Packing
from vtprune.testbed.fetch_attention import fetch_attention_loss
from vtprune.testbed.scenes_v3 import id_map, patch_coverage
from vtprune.testbed.splits import train_split


def test_fetch_cover_is_the_named_objects_pixel_share_and_a_relations_second():
    seen = {"first": 0, "second": 0}
    for i in range(20):
        scene = train_split(5).scene(i)
        qs = (questions_v3.candidates(scene, "relation")[:2] + questions_v3.candidates(scene, "leftof")[:1]
              + questions_v3.candidates(scene, "count")[:1])
        out = data_v3.fetch_cover(scene, qs, len(qs) + 1)
        assert out.shape == (len(qs) + 1, 2, 576) and not out[len(qs)].any()
        cov = patch_coverage(id_map(scene))
        for q, row in zip(qs, out, strict=False):
            first, second = questions_v3.fetched_objects(scene, q)
            if first is None:  # count
                assert not row.any()
                continue
            assert row[0].sum() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_array_equal(row[0] > 0, cov[:, first + 1] > 0)  # exactly the object's patches
            seen["first"] += 1
            if q.type != "relation":  # leftof's second object is found, not named
                assert not row[1].any()
                continue
            assert row[1].sum() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_array_equal(row[1] > 0, cov[:, second + 1] > 0)
            seen["second"] += 1
    assert min(seen.values()) > 10
    batch = data_v3.question_batch(train_split(5), 0, 4, Packing(3), with_pixels=False, with_fetch_cover=True,
                                   types=("relation", "colour", "count"))
    assert batch["fetch_cover"].shape == (4, 3, 2, 576)
    assert torch.equal(batch["fetch_cover"][:, :, 1].sum(-1) > 0, batch["second_named"])


def test_loss_is_the_cross_entropy_of_the_models_own_attention():
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.train import decoder_hidden, vision_features
    from vtprune.testbed.train_v3 import TINY_V3

    torch.manual_seed(0)
    model = build_model(replace(TINY_V3, text_layers=2), seed=0).eval()
    model.set_attn_implementation("eager")
    batch = data_v3.question_batch(train_split(3), 0, 6, Packing(questions_per_image=3), with_fetch_cover=True,
                                   types=("relation", "colour"))
    rows, pos, slot = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 3)
    cover = batch["fetch_cover"][rows, slot, 1]  # [K, 576]: the second objects
    named = cover.sum(-1) > 0
    assert named.any() and (~named).any()
    # a shortened row: keep a random 300 of the 576 patches, in order (as `train.shorten` does)
    keep = torch.sort(torch.randperm(576, generator=torch.Generator().manual_seed(1))[:300]).values
    patch_index = keep.expand(6, -1)
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])[:, keep]
        full = batch["input_ids"] == model.config.image_token_id
        img0 = int(full[0].nonzero()[0])
        assert (full.float().argmax(1) == img0).all()  # every row's image starts at the same position
        ids = torch.cat([batch["input_ids"][:, :img0 + 300], batch["input_ids"][:, img0 + 576:]], 1)  # 276 fewer
        image = ids == model.config.image_token_id
        assert int(image[0].sum()) == 300
        mask = torch.ones_like(ids)
        pos = pos - 276
        hidden = decoder_hidden(model, feats, ids, mask, all_layers=True)
        embeds = model.model.language_model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(image.unsqueeze(-1), model.model.multi_modal_projector(feats))
        attentions = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                output_attentions=True).attentions
        for layer in (1, 2):
            head = model.config.text_config.num_attention_heads - 1
            loss, mass, n = fetch_attention_loss(model, layer, head, hidden[layer - 1], ids, None, rows, pos,
                                                 cover, patch_index)
            have = cover[:, keep].sum(-1) > 0  # questions whose object shows in a kept patch
            assert n == int(have.sum()) and n <= int(named.sum())
            probs = attentions[layer - 1][rows[have], head, pos[have]]  # [K, T]
            target = torch.zeros_like(probs)
            target[:, img0:img0 + 300] = cover[have][:, keep]
            target = target / target.sum(-1, keepdim=True)
            ref = -(target * probs.clamp_min(1e-30).log()).sum(-1).mean()
            torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mass, float((probs * (target > 0)).sum(-1).mean()), rtol=1e-4, atol=1e-5)
    empty = fetch_attention_loss(model, 1, 0, hidden[0], ids, None, rows, pos, cover * 0, patch_index)
    assert empty[2] == 0 and float(empty[0]) == 0.0


def test_trainer_logs_the_fetch_attention_target_and_checks_its_layer(tmp_path):
    from vtprune.testbed.train import train
    from vtprune.testbed.train_v3 import TINY_V3

    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:relation",
                               fetch_attention_weight=1.0)
    logs: list[str] = []
    train_restoring_threads(tmp_path, cfg, logs.append)
    lines = [x for x in logs if x.startswith("B ") and "fetch-attention" in x]
    assert len(lines) == 1, logs  # logged every 25 steps
    for what in ("on-named", "on-second"):
        assert 0.0 <= float(lines[0].split(what + " ")[1].split()[0]) <= 1.0
    with pytest.raises(ValueError, match="fetch_attention_layer 7 is not a decoder layer"):
        train(tmp_path / "bad", replace(cfg, fetch_attention_layer=7), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="at least 2 heads, got 1"):
        train(tmp_path / "bad1", replace(cfg, size=replace(TINY_V3, text_heads=1)), progress=False, log=lambda _: None)
