"""The training-only attention target for counting (`count_attention.py`): the column each count question counts,
the loss against the model's own eager attention, and a trainer run that uses it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from factories import decoder_attentions, logged_step_values, tiny_v3_train_config, train_restoring_threads

from vtprune.testbed import data_v3, questions_v3
from vtprune.testbed.answer_readout import answer_positions
from vtprune.testbed.count_attention import count_attention_loss, grouped_cross_entropy
from vtprune.testbed.data import Packing
from vtprune.testbed.scenes_v3 import id_map, object_centres, object_groups, patch_coverage
from vtprune.testbed.splits import train_split


def test_each_count_question_counts_its_centre_column():
    seen = 0
    for i in range(30):
        scene = train_split(5).scene(i)
        centres = object_centres(scene).sum(0)  # [C + S]
        qs = questions_v3.candidates(scene, "count") + questions_v3.candidates(scene, "colour")[:1]
        channels = data_v3.count_channels(qs, len(qs) + 2)
        for q, ch in zip(qs, channels[:len(qs)], strict=True):
            if q.type == "count":
                assert centres[ch] == int(q.answer)
                seen += 1
            else:
                assert ch == -1
        assert (channels[len(qs):] == -1).all()
    assert seen > 30
    assert len(questions_v3.COUNT_CHANNELS) == len(set(questions_v3.COUNT_CHANNELS.values()))


def test_loss_is_the_cross_entropy_of_the_models_own_attention():
    """The head's distribution recomputed from the layer's input equals the eager attention's weights: the loss is
    the cross-entropy of the target (uniform over <s> and the centre tokens) against the model's real attention."""
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.train import decoder_hidden, vision_features
    from vtprune.testbed.train_v3 import TINY_V3

    torch.manual_seed(0)
    model = build_model(replace(TINY_V3, text_layers=2), seed=0).eval()
    model.set_attn_implementation("eager")
    batch = data_v3.question_batch(train_split(3), 0, 6, Packing(questions_per_image=4), with_counts=True,
                                   types=("count", "colour"))
    eos = model.config.text_config.eos_token_id
    rows, pos, slot = answer_positions(batch["labels"], eos, batch["count_channel"].shape[1])
    channel = batch["count_channel"][rows, slot]
    assert (channel >= 0).any() and (channel < 0).any()
    patch_index = torch.arange(576).expand(6, -1)
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])
        hidden = decoder_hidden(model, feats, batch["input_ids"], batch["attention_mask"], all_layers=True)
        image = batch["input_ids"] == model.config.image_token_id
        attentions = decoder_attentions(model, feats, batch["input_ids"], batch["attention_mask"])
        for layer, sink in ((1, 1.0), (2, 1.0), (2, 4.0)):
            loss, mass, n = count_attention_loss(model, layer, 0, hidden[layer - 1], batch["input_ids"], None, rows,
                                                 pos, channel, batch["centre"], patch_index, sink_weight=sink)
            keep = channel >= 0
            assert n == int(keep.sum())
            probs = attentions[layer - 1][rows[keep], 0, pos[keep]]  # [K, T]
            target = torch.zeros_like(probs)
            target[:, 0] = sink
            for k, (r, c) in enumerate(zip(rows[keep].tolist(), channel[keep].tolist(), strict=True)):
                img0 = int(image[r].nonzero()[0])
                target[k, img0: img0 + 576] = batch["centre"][r, :, c]  # one unit per centre (two in one patch: 2)
            target = target / target.sum(-1, keepdim=True)
            ref = -(target * probs.clamp_min(1e-30).log()).sum(-1).mean()
            torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mass, float((probs * (target > 0)).sum(-1).mean()), rtol=1e-4, atol=1e-5)
        # the per-object target: each counted object's attention summed over its tokens is one unit
        loss, mass, n = count_attention_loss(model, 2, 0, hidden[1], batch["input_ids"], None, rows, pos, channel,
                                             batch["centre"], patch_index, sink_weight=4.0, groups=batch["groups"])
        probs = attentions[1][rows[keep], 0, pos[keep]]  # [K, T]
        losses, masses = [], []
        for k, (r, c) in enumerate(zip(rows[keep].tolist(), channel[keep].tolist(), strict=True)):
            img0 = int(image[r].nonzero()[0])
            owners = batch["groups"][r, :, c].long()  # [576]
            objects = sorted(set(owners.tolist()) - {0})
            per_object = [float(probs[k, img0 + (owners == o).nonzero().squeeze(-1)].sum()) for o in objects]
            want = torch.tensor([4.0] + [1.0] * len(objects)) / (4.0 + len(objects))
            got = torch.tensor([float(probs[k, 0])] + per_object)
            losses.append(-(want * got.log()).sum())
            masses.append(float(got.sum()))
        torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mass, sum(masses) / len(masses), rtol=1e-4, atol=1e-5)
    # the target trains the head's own query / key projections and what feeds them, never a later layer
    model.zero_grad(set_to_none=True)
    layer_input = hidden[1].detach().requires_grad_(True)
    loss, _, _ = count_attention_loss(model, 2, 0, layer_input, batch["input_ids"], None, rows, pos, channel,
                                      batch["centre"], patch_index)
    loss.backward()
    layers = model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert layer_input.grad.abs().sum() > 0
    assert layers[1].self_attn.v_proj.weight.grad is None and layers[1].mlp.up_proj.weight.grad is None
    empty = count_attention_loss(model, 1, 0, hidden[0], batch["input_ids"], None, rows, pos, channel * 0 - 1,
                                 batch["centre"], patch_index)
    assert empty[2] == 0 and float(empty[0]) == 0.0


def test_every_object_owns_patches_in_its_colour_and_shape_columns():
    """`object_groups`: per column, one owner id per object of that colour / shape (every object owns at least one
    patch), an object's patches carry the same id in both of its columns, and a patch's owner has pixels there."""
    for i in range(30):
        scene = train_split(5).scene(i)
        groups = object_groups(scene).astype(int)  # [576, C + S]
        counts = object_centres(scene).sum(0)  # [C + S]: objects per colour / shape
        for col in range(groups.shape[1]):
            assert len(set(groups[:, col].tolist()) - {0}) == counts[col]
        colour, shape = groups[:, :6].max(1), groups[:, 6:].max(1)  # [576]: at most one owner per patch
        assert ((groups[:, :6] > 0).sum(1) <= 1).all() and (colour == shape).all()
        pixels = patch_coverage(id_map(scene))  # [576, 256]: id 1 + j is object j
        owned = colour.nonzero()[0]
        assert (pixels[owned, colour[owned]] > 0).all()


def test_grouped_cross_entropy_counts_each_object_once_wherever_its_attention_falls():
    # tokens: <s>, text, object 1 (two tokens), object 2 (one token), another object (0), text
    owner = torch.tensor([[0, 0, 1, 1, 2, 0, 0]])
    w = 4.0

    def attention(split: float, rest: float) -> torch.Tensor:
        unit = (1.0 - rest) / (w + 2)
        p = torch.tensor([[w * unit, rest / 2, split * unit, (1 - split) * unit, unit, rest / 2, 0.0]])
        return p.log()  # the last key is past the query: -inf

    want = torch.tensor([w, 1.0, 1.0]) / (w + 2)
    floor = -(want * want.log()).sum()
    for split in (0.5, 0.9, 1.0):  # object 1's unit split any way between its tokens: the same, minimal loss
        loss, mass = grouped_cross_entropy(attention(split, 0.0), owner, w)
        torch.testing.assert_close(loss, floor)
        assert mass == pytest.approx(1.0)
    leaky, mass = grouped_cross_entropy(attention(0.5, 0.2), owner, w)
    assert leaky > floor + 0.1 and mass == pytest.approx(0.8)
    # an object no token shows is not asked for; a count of 0 asks for <s> alone
    loss, _ = grouped_cross_entropy(torch.tensor([[0.0, float("-inf")]]), torch.zeros(1, 2, dtype=torch.long), w)
    assert float(loss) == pytest.approx(0.0)


def test_trainer_logs_the_count_attention_target_and_checks_its_layer(tmp_path):
    from vtprune.testbed.train import train

    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:count",
                               count_attention_weight=1.0)
    logs: list[str] = []
    train_restoring_threads(tmp_path, cfg, logs.append)
    lines = [x for x in logs if x.startswith("B ") and "count-attention" in x]
    assert len(lines) == 1, logs  # logged every 25 steps
    assert 0.0 <= float(lines[0].split("on-target ")[1].split()[0]) <= 1.0
    with pytest.raises(ValueError, match="count_attention_layer 7 is not a decoder layer"):
        train(tmp_path / "bad", replace(cfg, count_attention_layer=7), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="count_sink_weight must be > 0"):
        train(tmp_path / "bad1", replace(cfg, count_sink_weight=0.0), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown count_attention_unit 'patch' \\(accepted: centre, object\\)"):
        train(tmp_path / "bad2", replace(cfg, count_attention_unit="patch"), progress=False, log=lambda _: None)


def test_count_attention_heads_parse_and_reject_what_the_decoder_lacks():
    from vtprune.testbed.train import count_attention_heads

    assert count_attention_heads("", 4, 2) == []
    assert count_attention_heads("4:0, 4:1,2:1", 4, 2) == [(4, 0), (4, 1), (2, 1)]
    for bad in ("5:0", "0:0", "4:2", "4", "a:1", "4:-1"):
        with pytest.raises(ValueError, match=f"count_attention_heads entry '{bad}' is not LAYER:HEAD \\(accepted: "
                                             "layers 1..4, heads 0..1"):
            count_attention_heads(bad, 4, 2)


def test_trainer_with_more_count_heads_trains_each_of_them(tmp_path, monkeypatch):
    """Every listed head gets the count target at every step with count questions, head 0 of the target's layer
    first; the logged loss is their sum; a repeated head or heads without the target are errors."""
    import vtprune.testbed.train as train_module

    calls: list[tuple[int, int]] = []
    real = train_module.count_attention_loss

    def spy(model, layer, head, *args, **kwargs):
        calls.append((layer, head))
        return real(model, layer, head, *args, **kwargs)

    monkeypatch.setattr(train_module, "count_attention_loss", spy)
    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:count",
                               count_attention_weight=1.0, count_attention_layer=1, count_attention_heads="1:1")
    logged = logged_step_values(tmp_path, cfg, "count-attention")
    assert float(logged["count-attention"]) > 0.0
    assert len(calls) == 50 and calls[:2] == [(1, 0), (1, 1)] and set(calls[::2]) == {(1, 0)}, calls[:6]
    with pytest.raises(ValueError, match="repeats a head"):
        train_module.train(tmp_path / "bad", replace(cfg, count_attention_heads="1:0"), progress=False,
                           log=lambda _: None)
    with pytest.raises(ValueError, match="needs count_attention_weight > 0"):
        train_module.train(tmp_path / "bad1", replace(cfg, count_attention_weight=0.0), progress=False,
                           log=lambda _: None)


def test_trainer_with_the_per_object_count_target(tmp_path):
    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:count",
                               count_attention_weight=1.0, count_attention_unit="object")
    logged = logged_step_values(tmp_path, cfg, "count-attention")
    assert 0.0 < float(logged["on-target"]) <= 1.0 and float(logged["count-attention"]) > 0.0


def test_count_offsets_point_at_the_counted_phrases_last_word():
    v = data_v3.vocabulary()
    words = {i: w for w, i in v.items()}
    batch = data_v3.question_batch(train_split(5), 0, 6, Packing(6), with_pixels=False, with_counts=True,
                                   types=("count", "colour", "relation"))
    rows, pos, slot = answer_positions(batch["labels"], v["</s>"], 6)
    offsets, channel = batch["count_offsets"][rows, slot], batch["count_channel"][rows, slot]
    assert torch.equal(offsets != 0, channel >= 0)  # count questions, and only they
    counted = 0
    for r, p, off in zip(rows.tolist(), pos.tolist(), offsets.tolist(), strict=True):
        if off == 0:
            continue
        # "how many green objects are there ?" / "how many circles are there ?": the word before "are there ?"
        after = [words[int(t)] for t in batch["input_ids"][r, p + off + 1:p + off + 4]]
        assert after == ["are", "there", "?"] and words[int(batch["input_ids"][r, p + off])] != "many", after
        counted += 1
    assert counted > 3
    with pytest.raises(ValueError, match="not a count question"):
        questions_v3.count_phrase_end(questions_v3.Question("count", "how many ?", "1"))


def test_trainer_with_the_count_target_at_the_phrase_relayed_to_the_answer(tmp_path):
    from vtprune.testbed.train import train
    from vtprune.testbed.train_v3 import TINY_V3

    cfg = tiny_v3_train_config(steps_b=25, eval_every=25, save_every=25, type_schedule="25:count",
                               count_attention_weight=1.0, count_attention_layer=1, count_attention_at="name",
                               fetch_attention_weight=1.0, fetch_attention_at="name", fetch_attention_layer=1,
                               size=replace(TINY_V3, text_layers=2))
    logged = logged_step_values(tmp_path, cfg, "count-attention")
    assert 0.0 < float(logged["on-target"]) <= 1.0
    # only count questions: nothing named is fetched, and the relay reads the counted phrases' ends
    assert logged["on-named"] == "nan" and 0.0 < float(logged["on-names"]) <= 1.0
    with pytest.raises(ValueError, match="count_attention_layer 2 before the relay's layer 2"):
        train(tmp_path / "bad", replace(cfg, count_attention_layer=2), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="count_attention_at 'name' needs"):
        train(tmp_path / "bad1", replace(cfg, fetch_attention_at="answer"), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown count_attention_at 'words'"):
        train(tmp_path / "bad2", replace(cfg, count_attention_at="words"), progress=False, log=lambda _: None)
