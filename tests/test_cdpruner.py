"""CDPruner: spec properties (cdpruner.md "Properties a test can check"), naive references (brute-force greedy
log-det, the reference's CLIP relevance code), per-crop quotas, options and errors, and the shared engine
oracles on the three tiny families (relevance="llm") plus LLaVA / LLaVA-NeXT with a tiny local CLIP model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from factories import image_tokens
from families import check_oracles, family
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizerFast,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
)

import vtprune
from vtprune.budget import largest_remainder_split
from vtprune.errors import UnsupportedInputError, VtpruneError
from vtprune.methods import Stage, build_method
from vtprune.methods.cdpruner import (
    EPS_D2,
    RANK_TOL,
    alpha,
    cdpruner_select,
    conditional_kernel,
    exhaustion_threshold,
    greedy_map,
    llm_relevance,
    load_clip_relevance,
    minmax_relevance,
    theta_weight,
)

torch.set_num_threads(1)


def _naive_greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Brute force: each step adds the token maximising log det L[S ∪ j, S ∪ j] (fp64, ties to the lower index)."""
    kernel = kernel.double()
    sel: list[int] = []
    for _ in range(k):
        best, best_j = -math.inf, -1
        for j in range(kernel.shape[0]):
            if j in sel:
                continue
            idx = torch.tensor(sel + [j])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            val = float(logdet) if sign > 0 else -math.inf
            if val > best + 1e-9:
                best, best_j = val, j
        sel.append(best_j)
    return sel


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ spec properties 1–6
@pytest.mark.parametrize("k", [1, 5, 18, 35])
def test_p1_keep_idx_is_k_sorted_unique(k):
    img = image_tokens(((6, 6),), signals={"question_embeddings": _rand(5, 16, 9)})
    plan = build_method("cdpruner", {"relevance": "llm"}).select(0, img, k)
    idx = plan.keep_idx
    assert idx.dtype == torch.long and len(idx) == k and plan.new_feats is None
    assert torch.equal(idx, idx.unique()) and int(idx[0]) >= 0 and int(idx[-1]) < img.n


@pytest.mark.parametrize("seed", range(4))
def test_p2_gains_nonincreasing_and_sum_log_equals_logdet(seed):
    feats, r = _rand(40, 32, seed), torch.rand(40, generator=torch.Generator().manual_seed(seed + 50)) + 0.1
    kernel = conditional_kernel(feats, r)
    picks, d2, t_fill = greedy_map(kernel, 12, r)
    assert t_fill == 12
    assert bool((d2[1:] <= d2[:-1] * (1 + 1e-5)).all())
    _, logdet = torch.linalg.slogdet(kernel.double()[picks][:, picks])
    assert float(d2.double().log().sum()) == pytest.approx(float(logdet), rel=1e-3)


def test_p3_constant_relevance_is_plain_dpp_and_scale_invariant():
    feats = _rand(30, 24, 3)
    cosine = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T
    plain = sorted(_naive_greedy_logdet(cosine, 8))
    for c in (1.0, 0.37, 5.0):
        assert cdpruner_select(feats, torch.full((30,), c), 8).tolist() == plain
    r = torch.rand(30, generator=torch.Generator().manual_seed(4)) + 0.05
    base = cdpruner_select(feats, r, 10)
    for c in (0.1, 3.0, 40.0):
        assert torch.equal(cdpruner_select(feats, c * r, 10), base)
    # through the method: no question tokens (q undefined) or a constant q give r ≡ 1, i.e. the plain DPP
    img = image_tokens(feats=feats, grids=((5, 6),), signals={"question_embeddings": torch.zeros(0, 24)})
    assert build_method("cdpruner", {"relevance": "llm"}).select(0, img, 8).keep_idx.tolist() == plain


def test_p4_duplicated_token_never_selected_twice():
    feats = _rand(30, 64, 5)
    feats[7] = feats[3]
    feats[20] = 2.5 * feats[11]  # same direction: cosine 1
    feats[25] = feats[3]
    for seed in range(3):
        r = torch.rand(30, generator=torch.Generator().manual_seed(seed)) + 0.1
        r[7], r[25], r[20] = r[3], r[3], r[11]  # the duplicate tokens have the same relevance as well
        keep = set(cdpruner_select(feats, r, 26).tolist())
        assert len(keep & {3, 7, 25}) <= 1 and len(keep & {11, 20}) <= 1


def test_p5_relevance_is_per_sample_not_per_batch():
    """The reference min-max normalised q over the whole batch; here r of one image ignores every other."""
    q_a = torch.tensor([0.1, 0.5, 0.3, 0.2])
    q_b = torch.tensor([2.0, -3.0, 1.0, 0.0])
    r_a = minmax_relevance(q_a)
    assert torch.allclose(r_a, (q_a - q_a.min() + 1e-6) / (q_a.max() - q_a.min()))
    both = torch.cat([q_a, q_b])
    batchwise = (both - both.min() + 1e-6) / (both.max() - both.min())
    assert not torch.allclose(r_a, batchwise[:4])
    # the end-to-end part of property 5 (batch of two == single runs) is in the oracle tests below


@pytest.mark.parametrize("seed", range(6))
def test_p6_matches_brute_force_greedy_logdet_n12_k4(seed):
    g = torch.Generator().manual_seed(seed)
    feats, r = torch.randn(12, 6, generator=g), torch.rand(12, generator=g) + 0.05
    kernel = conditional_kernel(feats, r)
    picks, _, _ = greedy_map(kernel, 4, r)
    assert picks.tolist() == _naive_greedy_logdet(kernel, 4)
    assert cdpruner_select(feats, r, 4).tolist() == sorted(_naive_greedy_logdet(kernel, 4))


# ---------------------------------------------------------------------------------- algorithm details
def test_greedy_equals_spec_pseudocode():
    """Line-by-line spec step 6 (dense, with the fill rule) against the implementation."""
    for seed in range(3):
        feats, r = _rand(50, 20, seed + 10), torch.rand(50, generator=torch.Generator().manual_seed(seed)) + 0.01
        kernel = conditional_kernel(feats, r)
        k = 15
        cis, d2, sel = torch.zeros(k, 50), kernel.diagonal().clone(), []
        for t in range(k):
            d2m = d2.clone()
            d2m[sel] = -math.inf
            j = int(torch.argmax(d2m))
            if d2[j] <= 1e-10:
                raise AssertionError("not expected on full-rank data")
            e = (kernel[j] - cis[:t, j] @ cis[:t]) / torch.sqrt(d2[j])
            cis[t] = e
            d2 = d2 - e**2
            sel.append(j)
        assert greedy_map(kernel, k, r)[0].tolist() == sel


def test_fill_rule_on_rank_exhaustion():
    """Rank 3 with exactly representable numbers (axis directions, relevance powers of two), so the conditional
    variances of the remaining tokens become exactly 0 after three picks: the rest is filled by descending r."""
    axis = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    feats = F.one_hot(axis, 16).float() * torch.arange(1, 21).float()[:, None]  # scaled copies of 3 axes
    r = torch.tensor(
        [0.5, 1.0, 2.0, 4.0, 0.5, 1.0, 2.0, 0.5, 4.0, 1.0, 2.0, 0.5, 1.0, 2.0, 4.0, 4.0, 0.5, 1.0, 2.0, 1.0]
    )
    kernel = conditional_kernel(feats, r)
    picks, d2, t_fill = greedy_map(kernel, 8, r)
    assert t_fill == 3 and bool((d2[:3] > 1.0).all())
    assert picks[:3].tolist() == _naive_greedy_logdet(kernel, 3) == [3, 8, 10]  # the first token of largest r per axis
    rest = [i for i in torch.sort(r, descending=True, stable=True).indices.tolist() if i not in (3, 8, 10)]
    assert picks[3:].tolist() == rest[:5] == [14, 15, 2, 6, 13]  # ties in r go to the lower index
    assert len(set(picks.tolist())) == 8
    assert cdpruner_select(feats, r, 8).tolist() == sorted(picks.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_fill_rule_on_inexact_rank_exhaustion(seed):
    """Rank 3 in random fp32 numbers: the unpicked tokens keep conditional variances of rounding size (about 1e-7
    of the diagonal, not the spec's exact 1e-10), on which greedy picks would follow the machine's rounding. They
    count as exhausted (`exhaustion_threshold`): three greedy picks, then the fill by relevance."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(40, 3, generator=g) @ torch.randn(3, 16, generator=g)
    r = torch.rand(40, generator=g) + 0.05
    kernel = conditional_kernel(feats, r)
    picks, d2, t_fill = greedy_map(kernel, 10, r)
    assert t_fill == 3 and bool((d2[:3] > 1e-3).all())
    assert picks[:3].tolist() == _naive_greedy_logdet(kernel, 3)
    rest = [i for i in torch.sort(r, descending=True, stable=True).indices.tolist() if i not in picks[:3].tolist()]
    assert picks[3:].tolist() == rest[:7]
    # scaling the relevance scales the kernel: the threshold is relative, so the picks do not change
    assert greedy_map(conditional_kernel(feats, 1e-3 * r), 10, 1e-3 * r)[0].tolist() == picks.tolist()


def test_exhaustion_threshold_is_relative_with_the_spec_floor():
    assert float(exhaustion_threshold(torch.tensor(1.0))) == pytest.approx(RANK_TOL)
    assert float(exhaustion_threshold(torch.tensor(1e-8))) == pytest.approx(EPS_D2)
    assert exhaustion_threshold(torch.ones(3, 1)).shape == (3, 1)


def test_llm_relevance_positive_cosine_and_minmax():
    z, t = _rand(10, 8, 1), _rand(4, 8, 2)
    q = llm_relevance(z, t)
    want = torch.stack([F.cosine_similarity(z[i], t.mean(0), dim=0) for i in range(10)])
    assert torch.allclose(q, want, atol=1e-6)
    r = minmax_relevance(q)
    assert float(r.min()) == pytest.approx(1e-6 / float(q.max() - q.min()), rel=1e-4)
    assert float(r.max()) == pytest.approx(1.0 + 1e-6 / float(q.max() - q.min()), rel=1e-5)
    assert llm_relevance(z, torch.zeros(0, 8)) is None
    assert torch.equal(minmax_relevance(torch.full((5,), 0.3)), torch.ones(5))


def test_theta_weighting():
    assert alpha(0.5) == 0.5 and alpha(0.75) == pytest.approx(1.5)
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(theta_weight(r, None), r)
    assert torch.allclose(theta_weight(r, 0.5), torch.exp(0.5 * r))
    img = image_tokens(((6, 6),), signals={"question_embeddings": _rand(3, 16, 1)})
    q = llm_relevance(img.features, img.signals["question_embeddings"])
    want = cdpruner_select(img.features, torch.exp(0.5 * minmax_relevance(q)), 9)
    assert torch.equal(build_method("cdpruner", {"relevance": "llm", "theta": 0.5}).select(0, img, 9).keep_idx, want)
    for bad in (0.0, 1.0, -0.2, 1.5, True, "0.5"):
        with pytest.raises(VtpruneError, match="theta"):
            build_method("cdpruner", {"relevance": "llm", "theta": bad})


def test_per_crop_quotas_and_per_crop_relevance():
    """LLaVA-NeXT-like image: base view 6×6 + tile area 5×7; quotas by largest remainder; r normalised per crop."""
    q_emb = _rand(4, 16, 7)
    img = image_tokens(grids=((6, 6), (5, 7)), signals={"question_embeddings": q_emb}, seed=3)
    k = 20
    keep = build_method("cdpruner", {"relevance": "llm"}).select(0, img, k).keep_idx
    quotas = largest_remainder_split(k, [36, 35])
    assert [int((keep < 36).sum()), int((keep >= 36).sum())] == quotas == [10, 10]
    for lo, hi, quota in ((0, 36, quotas[0]), (36, 71, quotas[1])):
        f = img.features[lo:hi]
        r = minmax_relevance(llm_relevance(f, q_emb))
        assert torch.equal(keep[(keep >= lo) & (keep < hi)] - lo, cdpruner_select(f, r, quota))


def test_stage_signals_options_and_reference_preset():
    m = build_method("cdpruner", {"relevance": "llm"})
    assert m.stages() == (Stage("pre_llm"),) and m.signals(0) == {"question_embeddings"}
    c = build_method("cdpruner", {"clip_model": "/nonexistent"})
    assert c.stages() == (Stage("vision"),) and c.signals(0) == {"vision_features", "question_text"}
    assert m.schedule(576, 64, "layer_avg", 32) == [64] and m.schedule(576, 64, "retained", 32) == [64]
    with pytest.raises(VtpruneError, match="relevance"):
        build_method("cdpruner", {"relevance": "text"})
    with pytest.raises(VtpruneError, match="preset"):
        build_method("cdpruner", {"preset": "paper"})
    one = image_tokens(((6, 6),), signals={"question_embeddings": _rand(3, 16, 1)})
    ref = build_method("cdpruner", {"relevance": "llm", "preset": "reference"})
    assert torch.equal(ref.select(0, one, 7).keep_idx, m.select(0, one, 7).keep_idx)
    two = image_tokens(grids=((4, 4), (3, 4)), signals={"question_embeddings": _rand(3, 16, 1)})
    with pytest.raises(VtpruneError, match="multi-crop"):
        ref.select(0, two, 7)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    fam = family("llava")
    with pytest.raises(VtpruneError, match=r"clip_model=PATH.*relevance='llm'"):
        vtprune.apply(fam.models["sdpa"], "cdpruner", 64, clip_model=str(tmp_path / "no-clip"))
    assert vtprune.session_of(fam.models["sdpa"]) is None  # nothing was attached


def test_relevance_source_per_model(tiny_clip):
    """auto = the spec's source per model: "clip" on LLaVA (CLIP vision_features exist), "llm" on Qwen2.5-VL;
    an explicit relevance='clip' on Qwen is refused at apply time, naming the missing signal."""
    llava, qwen = family("llava").models["sdpa"], family("qwen2_5_vl").models["sdpa"]
    with vtprune.pruned(llava, "cdpruner", 64, clip_model=str(tiny_clip[0]), tokenizer=_lvlm_tokenizer()):
        assert vtprune.session_of(llava).stages == (Stage("vision"),)
    with vtprune.pruned(qwen, "cdpruner", 0.3):
        method = vtprune.session_of(qwen).method
        assert method.relevance == "llm" and method.stages() == (Stage("pre_llm"),)
    with pytest.raises(UnsupportedInputError, match="vision_features"):
        vtprune.apply(qwen, "cdpruner", 0.3, relevance="clip", clip_model=str(tiny_clip[0]))
    assert vtprune.session_of(qwen) is None


# ---------------------------------------------------------------------------------- CLIP relevance
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (vision width 32 = the tiny LLaVA's CLIP width, projection 16) and a byte-level CLIP
    tokenizer without merges (one token per character), saved to a local directory."""
    path = tmp_path_factory.mktemp("tiny-clip")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tok = CLIPTokenizerFast(vocab=vocab, merges=[])
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=514,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=2,
            pad_token_id=1,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ).to_dict(),
        projection_dim=16,
    )
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(path)
    tok.save_pretrained(path)
    return path, clip, tok


def _lvlm_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer "w0".."w255" of the tiny LVLMs (ids 0..3 special, 250 the image token)."""
    base = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", 250: "<image>"}
    vocab = {base.get(i, f"w{i}"): i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _reference_clip_relevance(clip, tok, feats, text):
    """The reference's code path (clip_encoder.py / llava_arch.py, one sample), written independently."""
    with torch.no_grad():
        inputs = tok(text=[text], return_tensors="pt")
        seg = (inputs.input_ids.shape[1] - 1) // 77 + 1
        pad = 77 * seg - inputs.input_ids.shape[1]
        inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], pad))], 1).reshape(-1, 77) for k, v in inputs.items()}
        text_embeds = clip.get_text_features(**inputs)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(feats))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        q = (-(image_embeds @ text_embeds.t())).mean(-1)
    return q, seg


@pytest.mark.parametrize("text", ["w7 w8 w9 w10", "what colour is the big cube? " * 8])
def test_clip_relevance_matches_reference_code(tiny_clip, text):
    path, clip, tok = tiny_clip
    rel = load_clip_relevance(str(path))
    feats = _rand(36, 32, 11)
    want, segments = _reference_clip_relevance(clip, tok, feats, text)
    assert segments == (1 if len(text) < 20 else 3)  # the long text is cut into 77-token rows
    assert rel.text_embeds(text, "cpu").shape == (segments, 16)
    assert torch.allclose(rel.relevance(feats, text), want, atol=1e-5)
    img = image_tokens(((6, 6),), feats=_rand(36, 12, 2), signals={"vision_features": feats}, question=text)
    keep = build_method("cdpruner", {"clip_model": str(path)}).select(0, img, 9).keep_idx
    assert torch.equal(keep, cdpruner_select(img.features, minmax_relevance(want), 9))
    with pytest.raises(VtpruneError, match="width"):
        rel.relevance(_rand(36, 24, 1), text)


# ---------------------------------------------------------------------------------- engine oracles
@pytest.mark.parametrize("name,budget", [("llava", 64), ("llava_next", 0.3), ("qwen2_5_vl", 0.3)])
def test_oracles_relevance_llm(name, budget):
    record = check_oracles(name, "cdpruner", budget, {"relevance": "llm"}, selection_only=True)
    for sample in record.samples:
        (ev,) = sample.events
        assert ev.stage == "pre_llm" and sample.retained_tokens == len(ev.keep_idx)


@pytest.mark.parametrize("name,budget", [("llava", 64), ("llava_next", 0.3)])
def test_oracles_relevance_clip(tiny_clip, name, budget):
    options = {"relevance": "clip", "clip_model": str(tiny_clip[0]), "tokenizer": _lvlm_tokenizer()}
    record = check_oracles(name, "cdpruner", budget, options, selection_only=True)
    for sample in record.samples:
        (ev,) = sample.events
        assert ev.stage == "vision"


def test_llava_clip_picks_equal_an_independent_pipeline(tiny_clip):
    """End to end on the tiny LLaVA: layer-22-equivalent CLIP patch features and the question text read by
    hand, the reference relevance code, per-sample min–max, greedy DPP on the projector outputs."""
    path, clip, tok = tiny_clip
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    vtprune.apply(model, "cdpruner", 64, clip_model=str(path), tokenizer=_lvlm_tokenizer())
    try:
        with torch.no_grad():
            model(**inputs)
        record = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    questions = ["w7 w8 w9 w10", "w17 w18 w19 w20 w21 w22 w23"]
    with torch.no_grad():
        vt = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patch = vt.hidden_states[model.config.vision_feature_layer][:, 1:]
        proj = model.model.multi_modal_projector(patch)
    for b, question in enumerate(questions):
        q, _ = _reference_clip_relevance(clip, tok, patch[b], question)
        want = cdpruner_select(proj[b], minmax_relevance(q), 64)
        assert torch.equal(record.samples[b].events[0].keep_idx, want)


def test_oracles_reference_preset_with_reindexed_positions():
    """preset='reference' on LLaVA-1.5: the default picks, with the reference's contiguous ids (reindex)."""
    options = {"relevance": "llm", "preset": "reference", "positions": "reindex"}
    record = check_oracles("llava", "cdpruner", 64, options, selection_only=True, bypass=False)
    default = check_oracles(
        "llava", "cdpruner", 64, {"relevance": "llm"}, selection_only=True, bypass=False, alone=False
    )
    for a, b in zip(record.samples, default.samples, strict=True):
        assert torch.equal(a.events[0].keep_idx, b.events[0].keep_idx)
