"""The training-only attention target for fetching a relation's second object (`fetch_attention.py`): its per-patch
target, the loss against the model's own eager attention, and a trainer run that uses it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import decoder_attentions, logged_step_values, tiny_v3_train_config, train_restoring_threads

from vtprune.testbed import data_v3, questions_v3
from vtprune.testbed.answer_readout import answer_positions
from vtprune.testbed.data import Packing
from vtprune.testbed.fetch_attention import fetch_attention_loss
from vtprune.testbed.scenes_v3 import id_map, patch_coverage
from vtprune.testbed.splits import train_split


def test_fetch_cover_is_the_named_objects_pixel_share_a_relations_second_and_a_leftofs_neighbour():
    seen = {"first": 0, "second": 0, "neighbour": 0}
    for i in range(20):
        scene = train_split(5).scene(i)
        qs = (questions_v3.candidates(scene, "relation")[:2] + questions_v3.candidates(scene, "leftof")[:1]
              + questions_v3.candidates(scene, "count")[:1])
        out = data_v3.fetch_cover(scene, qs, len(qs) + 1)
        assert out.shape == (len(qs) + 1, 3, 576) and not out[len(qs)].any()
        cov = patch_coverage(id_map(scene))
        for q, row in zip(qs, out, strict=False):
            first, second = questions_v3.fetched_objects(scene, q)
            if first is None:  # count
                assert not row.any()
                continue
            assert row[0].sum() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_array_equal(row[0] > 0, cov[:, first + 1] > 0)  # exactly the object's patches
            seen["first"] += 1
            if q.type != "relation":  # leftof's second object is found, not named: channel 2
                assert not row[1].any()
                assert row[2].sum() == pytest.approx(1.0, rel=1e-5)
                np.testing.assert_array_equal(row[2] > 0, cov[:, second + 1] > 0)
                seen["neighbour"] += 1
                continue
            assert not row[2].any()
            assert row[1].sum() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_array_equal(row[1] > 0, cov[:, second + 1] > 0)
            seen["second"] += 1
    assert min(seen.values()) >= 10
    batch = data_v3.question_batch(train_split(5), 0, 4, Packing(3), with_pixels=False, with_fetch_cover=True,
                                   types=("relation", "colour", "count"))
    assert batch["fetch_cover"].shape == (4, 3, 3, 576)
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
        attentions = decoder_attentions(model, feats, ids, mask)
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


def test_name_offsets_point_at_the_last_word_of_each_named_object():
    v = data_v3.vocabulary()
    words = {i: w for w, i in v.items()}
    batch = data_v3.question_batch(train_split(5), 0, 6, Packing(6), with_pixels=False,
                                   types=questions_v3.QUESTION_TYPES + questions_v3.TRAINING_TYPES)
    rows, pos, slot = answer_positions(batch["labels"], v["</s>"], 6)
    offsets = batch["name_offsets"][rows, slot]  # [K, 2]
    seen = {"first": 0, "second": 0, "none": 0}
    for r, p, (a, b) in zip(rows.tolist(), pos.tolist(), offsets.tolist(), strict=True):
        start = p - 1
        while words[int(batch["input_ids"][r, start - 1])] not in (":", "<image>"):  # back to "user :" / the image
            start -= 1
        text = " ".join(words[int(t)] for t in batch["input_ids"][r, start:p - 1])  # the question (to its "?")
        order = sorted(questions_v3._NAMED, key=lambda t: t != "leftof")  # "what colour is the object left of ..."
        qtype = next((t for t in order if questions_v3._NAMED[t].fullmatch(text)), None)
        if text.startswith("is there a "):  # exist: the asked object's shape word, present or not
            assert words[int(batch["input_ids"][r, p + a])] == text.split()[-2] and b == 0, text
            seen["exist"] = seen.get("exist", 0) + 1
            continue
        if qtype is None:  # count, number: nothing named to fetch
            assert a == b == 0, text
            seen["none"] += 1
            continue
        match = questions_v3._NAMED[qtype].fullmatch(text)
        assert words[int(batch["input_ids"][r, p + a])] == match.group(1).split()[-1] and a < -2, text
        seen["first"] += 1
        if qtype == "relation":
            assert words[int(batch["input_ids"][r, p + b])] == match.group(2).split()[-1] and a < b < -2, text
            seen["second"] += 1
        else:
            assert b == 0, text
    assert min(seen.values()) > 0 and "exist" in seen, seen


def test_relay_loss_is_the_cross_entropy_of_the_models_own_attention_on_the_name_ends():
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.fetch_attention import relay_attention_loss
    from vtprune.testbed.train import decoder_hidden, vision_features
    from vtprune.testbed.train_v3 import TINY_V3

    torch.manual_seed(0)
    model = build_model(replace(TINY_V3, text_layers=2), seed=0).eval()
    model.set_attn_implementation("eager")
    batch = data_v3.question_batch(train_split(3), 0, 4, Packing(questions_per_image=3),
                                   types=("relation", "colour", "count"))
    rows, pos, slot = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 3)
    offsets = batch["name_offsets"][rows, slot]
    sources = (pos[:, None] + offsets).masked_fill(offsets == 0, 0)  # [K, 2]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])
        hidden = decoder_hidden(model, feats, ids, mask, all_layers=True)
        attentions = decoder_attentions(model, feats, ids, mask)
        head = model.config.text_config.num_attention_heads - 1
        loss, mass, n = relay_attention_loss(model, 2, head, hidden[1], None, rows, pos, sources)
    named = (offsets != 0).any(-1)
    assert n == int(named.sum()) and 0 < n < len(rows)
    probs = attentions[1][rows[named], head, pos[named]]  # [K', T]
    target = torch.zeros_like(probs).scatter_add_(1, sources[named], (offsets[named] != 0).float())
    target = target / target.sum(-1, keepdim=True)
    assert ((target > 0).sum(-1) == 1 + (offsets[named, 1] != 0).long()).all()  # one or two name ends
    ref = -(target * probs.clamp_min(1e-30).log()).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mass, float((probs * (target > 0)).sum(-1).mean()), rtol=1e-4, atol=1e-5)


def test_trainer_with_the_targets_at_the_names(tmp_path):
    from vtprune.testbed.train import train
    from vtprune.testbed.train_v3 import TINY_V3

    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:relation+colour+number",
                               fetch_attention_weight=1.0, fetch_attention_at="name", fetch_attention_layer=1,
                               size=replace(TINY_V3, text_layers=2))
    logged = logged_step_values(tmp_path, cfg, "fetch-attention")
    for what in ("on-named", "on-second", "on-names"):
        assert 0.0 <= float(logged[what]) <= 1.0
    with pytest.raises(ValueError, match="fetch_relay_layer 3 is not in 3..2"):
        train(tmp_path / "bad", replace(cfg, fetch_attention_layer=2), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="fetch_relay_layer 1 is not in 2..2"):
        train(tmp_path / "bad2", replace(cfg, fetch_relay_layer=1), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match=r"fetch_neighbour_layer 2 needs .* \(accepted: 3..2, or 0 for none\)"):
        train(tmp_path / "bad3", replace(cfg, fetch_neighbour_layer=2), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match=r"fetch_neighbour_layer 2 needs fetch_attention_weight > 0"):
        train(tmp_path / "bad4", replace(cfg, fetch_attention_weight=0.0, fetch_neighbour_layer=2), progress=False,
              log=lambda _: None)
    with pytest.raises(ValueError, match="unknown fetch_attention_at 'words'"):
        train(tmp_path / "bad1", replace(cfg, fetch_attention_at="words"), progress=False, log=lambda _: None)


def test_trainer_with_the_left_neighbour_target_after_the_relay(tmp_path):
    from vtprune.testbed.train_v3 import TINY_V3

    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:leftof+colour",
                               fetch_attention_weight=1.0, fetch_attention_at="name", fetch_attention_layer=1,
                               fetch_neighbour_layer=3, size=replace(TINY_V3, text_layers=3))
    assert 0.0 < float(logged_step_values(tmp_path, cfg, "fetch-attention")["on-neighbour"]) <= 1.0


def test_a_number_questions_targets_are_its_tens_and_its_units_digits_ink():
    from vtprune.testbed.scenes_v3 import DIGIT_ID

    for i in range(5):
        scene = train_split(6).scene(i)
        qs = questions_v3.candidates(scene, "number")[:1] + questions_v3.candidates(scene, "count")[:1]
        out = data_v3.fetch_cover(scene, qs, 2)
        cov = patch_coverage(id_map(scene))
        for place in (0, 1):
            assert out[0, place].sum() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_array_equal(out[0, place] > 0, cov[:, DIGIT_ID + place] > 0)
        assert not out[1].any()


def test_one_head_per_query_equals_each_heads_own_attention():
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.head_attention import head_log_attention
    from vtprune.testbed.train import decoder_hidden, vision_features
    from vtprune.testbed.train_v3 import TINY_V3

    torch.manual_seed(0)
    model = build_model(replace(TINY_V3, text_heads=4, text_width=32), seed=0).eval()
    batch = data_v3.question_batch(train_split(3), 0, 2, Packing(questions_per_image=3), types=("colour",))
    rows, pos, _ = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 3)
    heads = torch.arange(len(rows)) % 4
    with torch.no_grad():
        hidden = decoder_hidden(model, vision_features(model, batch["pixel_values"]), batch["input_ids"],
                                batch["attention_mask"], all_layers=True)
        mixed = head_log_attention(model, 1, heads, hidden[0], None, rows, pos)
        for h in range(4):
            own = head_log_attention(model, 1, h, hidden[0], None, rows, pos)
            torch.testing.assert_close(mixed[heads == h], own[heads == h])


def test_an_exist_questions_target_is_the_asked_objects_or_the_first_token():
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.train import decoder_hidden, vision_features
    from vtprune.testbed.train_v3 import TINY_V3

    seen = {"yes": 0, "no": 0}
    for i in range(6):
        scene = train_split(7).scene(i)
        qs = questions_v3.candidates(scene, "exist")
        out, sink = data_v3.fetch_cover(scene, qs, len(qs)), data_v3.fetch_sink(qs, len(qs))
        cov = patch_coverage(id_map(scene))
        for k, q in enumerate(qs):
            matches = questions_v3.exist_matches(scene, q)
            assert bool(matches) == (q.answer == "yes") == (not sink[k])
            if matches:
                np.testing.assert_array_equal(out[k, 0] > 0, cov[:, [m + 1 for m in matches]].sum(1) > 0)
                assert out[k, 0].sum() == pytest.approx(1.0, rel=1e-5)
            else:
                assert not out[k].any()
            seen[q.answer] += 1
    assert min(seen.values()) > 5
    # the loss: a sink query's target is <s> alone
    torch.manual_seed(0)
    model = build_model(TINY_V3, seed=0).eval()
    model.set_attn_implementation("eager")
    batch = data_v3.question_batch(train_split(7), 0, 4, Packing(questions_per_image=4), with_fetch_cover=True,
                                   types=("exist",))
    rows, pos, slot = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 4)
    cover, sink = batch["fetch_cover"][rows, slot, 0], batch["fetch_sink"][rows, slot]
    assert sink.any() and (~sink).any()
    patch_index = torch.arange(576).expand(4, -1)
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])
        hidden = decoder_hidden(model, feats, batch["input_ids"], batch["attention_mask"], all_layers=True)
        loss, _, n = fetch_attention_loss(model, 1, 0, hidden[0], batch["input_ids"], None, rows, pos, cover,
                                          patch_index, sink)
        probs = decoder_attentions(model, feats, batch["input_ids"], batch["attention_mask"])[0][rows, 0, pos]
    assert n == len(rows)
    img0 = int((batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    target = torch.zeros_like(probs)
    target[:, img0:img0 + 576] = cover
    target[sink, 0] = 1.0
    ref = -(target * probs.clamp_min(1e-30).log()).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
