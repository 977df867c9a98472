"""ResPrune (spec resprune.md): Step A text relevance, Step B greedy residual-energy selection (single and
batched), every "Properties a test can check" item, the no-spaCy noun tagger, the engine's
`noun_embeddings` path with an offline WordPiece tokenizer, and the shared oracles on the three families.

Spec property -> test:
1. energies non-increasing, picks at e = 0      test_property1_energies_non_increasing_and_picks_zeroed
2. orthonormal directions                       test_property2_directions_orthonormal
3. α = 0 == column-pivoted QR of Vᵀ             test_property3_alpha0_equals_scipy_pivoted_qr
4. scale / rotation invariance                  test_property4_scale_invariance, test_property4_rotation_invariance
5. permutation equivariance                     test_property5_permutation_equivariance
6. rank-deficient: span then fill rule          test_property6_rank_deficient_fill_rule
7. K unique sorted; DPP log-det gains           test_property7_output_and_dpp_logdet_gains
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from factories import image_tokens
from families import FAMILIES, check_oracles, family
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import build_method, method_class
from vtprune.methods.base import Stage
from vtprune.methods.resprune import ResPrune, residual_greedy, residual_greedy_batched, text_relevance
from vtprune.testing import IMAGE_TOKEN_ID, llava_inputs
from vtprune.text import extract_nouns, question_nouns, spacy_available

torch.set_num_threads(1)


def _image(feats, nouns=None):
    n = feats.shape[0]
    signals = {} if nouns is None else {"noun_embeddings": nouns}
    return image_tokens(((n // 24 + 1, 24),), n=n, feats=feats, signals=signals, seed=0)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _proj_residual(V: torch.Tensor, S: list[int]) -> torch.Tensor:
    """Exact ‖v − P_S v‖² of every row (float64).  V (N, d) -> (N,)."""
    V = V.double()
    if not S:
        return (V * V).sum(1)
    Q, _ = torch.linalg.qr(V[S].T)  # (d, |S|)
    R = V - (V @ Q) @ Q.T
    return (R * R).sum(1)


def _naive(V, w, k, tol=1e-6):
    """The spec's Step B pseudo-code in float64 with exact projections (no deflation drift)."""
    V, w = V.double(), w.double()
    norms = (V * V).sum(1)
    e0 = float(norms.max())
    S: list[int] = []
    for _ in range(k):
        score = w * _proj_residual(V, S)
        score[S] = -math.inf
        j = int(score.argmax())
        if float(_proj_residual(V, S)[j]) <= tol * e0:
            key = w * norms
            key[S] = -math.inf
            return S + torch.sort(key, descending=True, stable=True).indices[: k - len(S)].tolist()
        S.append(j)
    return S


# --------------------------------------------------------------------------------- Step A: relevance


def test_text_relevance_matches_naive_formula():
    V, T = _randn(50, 16, seed=1), _randn(3, 16, seed=2)
    for alpha, floor in ((1.0, 0.05), (2.0, 0.05), (0.5, 0.2), (4.0, 0.0)):
        w = text_relevance(V, T, alpha, floor)
        raw = [max(float(V[i] @ T[k] / (V[i].norm() * T[k].norm())) for k in range(3)) for i in range(50)]
        lo, hi = min(raw), max(raw)
        want = [max((x - lo) / (hi - lo), floor) ** alpha for x in raw]
        assert w.dtype == torch.float32 and w.shape == (50,)
        assert torch.allclose(w, torch.tensor(want), atol=1e-5)
    assert float(text_relevance(V, T, 1.0, 0.05).min()) == pytest.approx(0.05)
    assert float(text_relevance(V, T, 1.0, 0.05).max()) == pytest.approx(1.0)


def test_text_relevance_without_conditioning_is_one():
    V, T = _randn(40, 8, seed=3), _randn(2, 8, seed=4)
    for w in (text_relevance(V, None), text_relevance(V, torch.zeros(0, 8)), text_relevance(V, T, alpha=0.0)):
        assert torch.equal(w, torch.ones(40))
    same = V[:1].repeat(40, 1) * torch.arange(1, 41.0)[:, None]  # equal cosines: range < 1e-6 -> r ≡ 1
    assert torch.equal(text_relevance(same, T, 2.0), torch.ones(40))
    with pytest.raises(VtpruneError, match="noun_embeddings"):
        text_relevance(V, torch.rand(40))  # (n,) is not (n_nouns, d)


def test_low_precision_features_are_selected_in_fp32():
    V, T = _randn(100, 32, seed=28).bfloat16(), _randn(2, 32, seed=29).bfloat16()
    plan = ResPrune().select(0, _image(V, T), 20)
    w = text_relevance(V.float(), T.float())
    assert torch.equal(plan.keep_idx, residual_greedy(V.float(), w, 20)[0])


@pytest.mark.parametrize(
    "question,nouns",
    [
        ("What color is the car parked next to the red bus?", ["color", "car", "bus"]),
        ("How many dogs are there in the picture? Answer the question using a single word or phrase.", ["dog"]),
        ("Is the woman holding an umbrella? Is the umbrella open?", ["woman", "umbrella"]),
        ("Describe the image in detail.", ["detail"]),
        ("What's on the table, and who is sitting at it?", ["table"]),
    ],
)
def test_nouns_without_spacy(question, nouns):
    """Spec Step A.1 without spaCy (issue #22): the built-in tagger keeps nouns only (no "parked", "red",
    "holding"), lemmatised, and never the instruction's words; more in tests/test_resprune_nouns.py."""
    got = question_nouns(question, use_spacy=False)
    assert got == nouns
    assert all(w.isalpha() and w == w.lower() for w in got)
    if not spacy_available():  # this machine: the default path is the rule-based tagger
        assert question_nouns(question) == nouns


# --------------------------------------------------------------------------------- Step B: properties


def test_selection_matches_naive_pseudocode():
    V, T = _randn(120, 48, seed=5), _randn(2, 48, seed=6)
    w = text_relevance(V, T, 1.0, 0.05)
    keep, order = residual_greedy(V, w, 40)
    assert order.tolist() == _naive(V, w, 40)
    assert keep.tolist() == sorted(order.tolist())
    plan = ResPrune().select(0, _image(V, T), 40)
    assert torch.equal(plan.keep_idx, keep) and plan.new_feats is None


def test_property1_energies_non_increasing_and_picks_zeroed():
    V, w = _randn(150, 80, seed=7), torch.rand(150, generator=torch.Generator().manual_seed(8)) + 0.1
    k = 70
    _, order, diag = residual_greedy(V, w, k, refresh=32, diagnostics=True)
    E = diag["energies"]  # (k+1, N)
    e0 = float(E[0].max())
    assert E.shape == (k + 1, 150)
    assert (E[1:] <= E[:-1] + 1e-6 * e0).all()  # exact refreshes may move e by rounding only
    for t in range(k):
        j = int(order[t])
        assert E[t + 1, j] <= 1e-5 * e0
        assert (E[t + 1 :, j] <= 1e-5 * e0).all()
    for t in (1, 31, 32, 50, k):  # tracked energies follow the exact residuals
        exact = _proj_residual(V, order[:t].tolist())
        assert (E[t].double() - exact).abs().max() <= 1e-4 * e0
        assert exact[order[:t]].max() <= 1e-5 * e0


def test_property2_directions_orthonormal():
    V = _randn(300, 96, seed=9) * torch.linspace(0.1, 10.0, 300)[:, None]
    w = text_relevance(V, _randn(3, 96, seed=10))
    _, order, diag = residual_greedy(V, w, 90, diagnostics=True)
    Q = diag["q"].double()
    assert Q.shape == (90, 96) and diag["rank"] == 90
    assert (Q @ Q.T - torch.eye(90, dtype=torch.float64)).abs().max() <= 1e-4
    # and they span the picked tokens
    picked = V[order].double()
    assert ((picked - (picked @ Q.T) @ Q).norm(dim=1) <= 1e-4 * picked.norm(dim=1)).all()


@pytest.mark.parametrize("n,d,k,seed", [(200, 64, 40, 11), (100, 150, 90, 12), (576, 64, 64, 13)])
def test_property3_alpha0_equals_scipy_pivoted_qr(n, d, k, seed):
    V = _randn(n, d, seed=seed)
    w = text_relevance(V, _randn(2, d, seed=seed + 1), alpha=0.0)
    keep, order = residual_greedy(V, w, k)
    _, _, piv = scipy.linalg.qr(V.double().numpy().T, pivoting=True, mode="economic")
    assert order.tolist() == piv[:k].tolist()
    plan = ResPrune(ResPrune.config_class(alpha=0.0)).select(0, _image(V), k)
    assert plan.keep_idx.tolist() == sorted(piv[:k].tolist())


@pytest.mark.parametrize("scale", [1e-3, 0.37, 7.3, 1e3])
def test_property4_scale_invariance(scale):
    V, T = _randn(200, 64, seed=14), _randn(3, 64, seed=15)
    method = ResPrune()
    ref = method.select(0, _image(V, T), 48).keep_idx
    assert torch.equal(method.select(0, _image(V * scale, T), 48).keep_idx, ref)
    assert torch.equal(method.select(0, _image(V, T * scale), 48).keep_idx, ref)


def test_property4_rotation_invariance():
    d = 64
    V, T = _randn(200, d, seed=16), _randn(3, d, seed=17)
    rot, _ = torch.linalg.qr(_randn(d, d, seed=18, dtype=torch.float64))
    rot = rot.float()
    for alpha in (0.0, 1.0, 2.0):
        method = ResPrune(ResPrune.config_class(alpha=alpha))
        ref = method.select(0, _image(V, T), 60).keep_idx
        assert torch.equal(method.select(0, _image(V @ rot, T @ rot), 60).keep_idx, ref)


def test_property5_permutation_equivariance():
    V, T = _randn(240, 48, seed=19), _randn(2, 48, seed=20)
    perm = torch.randperm(240, generator=torch.Generator().manual_seed(21))
    w = text_relevance(V, T)
    _, order = residual_greedy(V, w, 45)
    keep_p, order_p = residual_greedy(V[perm], text_relevance(V[perm], T), 45)
    assert torch.equal(perm[order_p], order)
    assert torch.equal(perm[keep_p].sort().values, order.sort().values)


@pytest.mark.parametrize("rank,k", [(10, 25), (10, 10), (1, 5)])
def test_property6_rank_deficient_fill_rule(rank, k):
    g = torch.Generator().manual_seed(22)
    V = torch.randn(100, rank, generator=g) @ torch.randn(rank, 64, generator=g)
    V[7] = V[3]  # an exact duplicate
    w = torch.rand(100, generator=g) + 0.05
    keep, order, diag = residual_greedy(V, w, k, diagnostics=True)
    assert diag["rank"] == min(rank, k) and diag["q"].shape[0] == min(rank, k)
    e0 = float((V.double() ** 2).sum(1).max())
    span = order[:rank].tolist()
    assert _proj_residual(V, span).max() <= 1e-6 * e0  # the first r picks span V exactly
    if k > rank:
        key = (w * (V * V).sum(1)).double()
        key[span] = -math.inf
        assert order[rank:].tolist() == torch.sort(key, descending=True, stable=True).indices[: k - rank].tolist()
    assert order.tolist() == _naive(V, w, k)
    assert keep.tolist() == sorted(set(order.tolist())) and len(keep) == k
    zero = residual_greedy(torch.zeros(20, 8), torch.ones(20), 5)[1]  # rank 0: pure fill, ties to lower index
    assert zero.tolist() == [0, 1, 2, 3, 4]


def test_property7_output_and_dpp_logdet_gains():
    V, T = _randn(90, 40, seed=23, dtype=torch.float64).float(), _randn(2, 40, seed=24)
    w = text_relevance(V, T, 2.0, 0.05)
    k = 30
    keep, order, diag = residual_greedy(V, w, k, diagnostics=True)
    assert keep.dtype == torch.long and keep.shape == (k,)
    assert torch.equal(keep, keep.unique()) and 0 <= int(keep[0]) and int(keep[-1]) < 90
    sw = w.double().sqrt()
    L = sw[:, None] * (V.double() @ V.double().T) * sw[None, :]
    prev = 0.0
    for t in range(k):
        S = order[: t + 1].tolist()
        logdet = float(torch.linalg.slogdet(L[S][:, S]).logabsdet)
        gain = logdet - prev
        assert gain == pytest.approx(math.log(float(diag["scores"][t])), abs=2e-3)
        # greedy MAP: the pick maximises the log-det gain over all unpicked tokens
        gains = w.double() * _proj_residual(V, S[:-1])
        gains[S[:-1]] = -math.inf
        assert int(gains.argmax()) == S[-1]
        prev = logdet


def test_refresh_period_does_not_change_a_well_conditioned_selection():
    V, T = _randn(300, 128, seed=25), _randn(3, 128, seed=26)
    w = text_relevance(V, T)
    ref = residual_greedy(V, w, 100)[1]
    for refresh in (0, 1, 7, 1000):
        assert torch.equal(residual_greedy(V, w, 100, refresh=refresh)[1], ref)


def test_batched_equals_single_with_variable_n_and_k():
    g = torch.Generator().manual_seed(27)
    bsz, n, d = 4, 130, 48
    V = torch.randn(bsz, n, d, generator=g)
    V[2, :, 6:] = 0.0  # rank 6: exercises the fill rule in one sample
    V[3] = V[3].half().float()
    w = torch.rand(bsz, n, generator=g) + 0.05
    valid = torch.ones(bsz, n, dtype=torch.bool)
    valid[1, 90:] = False
    valid[3, ::3] = False  # padding need not be at the end
    V[~valid] = 1e3  # garbage in padding rows must not matter
    ks = torch.tensor([40, 25, 20, 0])
    keep, order = residual_greedy_batched(V, w, valid, ks, refresh=16)
    assert keep.shape == order.shape == (bsz, 40)
    for b in range(bsz):
        idx = valid[b].nonzero().flatten()
        k1, o1 = residual_greedy(V[b, idx], w[b, idx], int(ks[b]), refresh=16)
        kb = int(ks[b])
        assert torch.equal(order[b, :kb], idx[o1]) and torch.equal(keep[b, :kb], idx[k1])
        assert (order[b, kb:] == -1).all() and (keep[b, kb:] == -1).all()
    with pytest.raises(VtpruneError):
        residual_greedy_batched(V, w, valid, torch.tensor([40, 100, 20, 0]))


# --------------------------------------------------------------------------------- method interface


def test_registration_signals_schedule_and_options():
    assert method_class("resprune") is ResPrune
    m = build_method("resprune", {})
    c = m.config
    assert (c.alpha, c.relevance_floor, c.rank_tol, c.refresh) == (1.0, 0.05, 1e-6, 32)
    assert m.stages() == (Stage("pre_llm"),) and not m.merges
    assert m.signals(0) == frozenset({"noun_embeddings", "question_text"})
    assert build_method("resprune", {"alpha": 0.0}).signals(0) == frozenset()
    assert build_method("resprune", {"alpha": 0.5}).signals(0) == frozenset({"noun_embeddings", "question_text"})
    assert m.schedule(576, 128, "retained", 32) == [128] and m.schedule(576, 128, "layer_avg", 32) == [128]
    for bad in (
        {"alpha": -1.0},
        {"alpha": math.nan},
        {"relevance_floor": 1.5},
        {"rank_tol": -1e-3},
        {"refresh": -1},
        {"refresh": 2.5},
        {"preset": "reference"},
    ):
        with pytest.raises(VtpruneError):
            build_method("resprune", bad)


# --------------------------------------------------------------------------------- engine + tokenizer

SPECIALS = dict(
    zip(
        (0, 1, 2, 3, 250, 251, 252, 253),
        "<pad> <s> </s> <unk> <image> <|video_pad|> <|vision_start|> <|vision_end|>".split(),
        strict=True,
    )
)
# ids 7..10 and 17..23 are the question ids of `families.PROMPTS`: "where dog and tree", "how many red car on a table"
WORDS = dict(
    enumerate(
        "the user : where dog and tree ? assistant is ##house ##s cat how many red car on a table".split(), start=4
    )
)


def _letters(i: int) -> str:
    return "zq" + chr(97 + i // 26) + chr(97 + i % 26)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Offline WordPiece tokenizer over the tiny models' 256 ids: real words, two "##" sub-words, fillers."""
    vocab = {SPECIALS.get(i) or WORDS.get(i) or _letters(i): i for i in range(256)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [SPECIALS[i] for i in (250, 251, 252, 253)]})
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _captured(model):
    """Wrap the attached method's select to keep every ImageTokens it receives (and its plan)."""
    method = vtprune.session_of(model).method
    stock = method.select
    seen = []

    def select(stage, image, k):
        plan = stock(stage, image, k)
        seen.append((image, k, plan))
        return plan

    method.select = select
    return seen


def test_engine_noun_embeddings_are_mean_subword_rows(tok):
    assert tok(" doghouse", add_special_tokens=False)["input_ids"] == [8, 14]
    model = family("llava").models["sdpa"]
    prefix = tok("<s> user :", add_special_tokens=False)["input_ids"]
    suffix = tok("where is the doghouse and the tree and the dogs ? assistant :", add_special_tokens=False)["input_ids"]
    assert IMAGE_TOKEN_ID not in prefix + suffix and 3 not in suffix  # no <unk>
    inputs = llava_inputs(model, [(prefix, suffix)], seed=3)
    vtprune.apply(model, "resprune", 64, tokenizer=tok)
    try:
        seen = _captured(model)
        with torch.no_grad():
            model(**inputs)
        rec = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    ((image, k, plan),) = seen
    E = model.get_input_embeddings().weight.detach().float()
    # nouns of "where is the doghouse and the tree and the dogs ?": doghouse = dog + ##house, tree, dog (lemma)
    want = torch.stack([E[[8, 14]].mean(0), E[10], E[8]])
    question = "where is the doghouse and the tree and the dogs?"  # as the tokenizer decodes the span
    assert question_nouns(question) == ["doghouse", "tree", "dog"]
    assert torch.allclose(image.signals["noun_embeddings"], want, atol=0, rtol=0)
    assert k == 64 and image.n == 576 and "question_embeddings" not in image.signals
    w = text_relevance(image.features, want, 1.0, 0.05)
    assert torch.equal(plan.keep_idx, residual_greedy(image.features, w, 64)[0])
    assert torch.equal(rec.samples[0].events[0].keep_idx, plan.keep_idx.cpu())
    assert rec.samples[0].retained_tokens == 64
    # last_run names the extractor and the words that conditioned the selection, per sample (one image here)
    found = extract_nouns(question)
    assert image.question == question
    assert rec.samples[0].method_info == [
        {"noun_extractor": found.extractor, "nouns": ["doghouse", "tree", "dog"], "question": question}
    ]
    assert found.extractor == ("spacy" if spacy_available() else "rules")


def test_alpha0_needs_no_tokenizer_and_alpha1_without_one_fails():
    model = family("llava").models["sdpa"]
    inputs = family("llava").batches[1]
    vtprune.apply(model, "resprune", 32, alpha=0.0)
    try:
        seen = _captured(model)
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    ((image, k, plan),) = seen
    assert image.signals == {} and k == 32
    keep, _ = residual_greedy(image.features, torch.ones(image.n), 32)
    assert torch.equal(plan.keep_idx, keep)
    with pytest.raises(VtpruneError, match="tokenizer"):
        vtprune.apply(model, "resprune", 32)
    assert vtprune.session_of(model) is None  # nothing left attached after the failed apply


# --------------------------------------------------------------------------------- shared oracles

BUDGETS = {"llava": 64, "llava_next": 0.3, "qwen2_5_vl": 0.3}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_oracles(name, alpha, tok):
    options = {"alpha": alpha} if alpha == 0 else {"alpha": alpha, "tokenizer": tok}
    record = check_oracles(name, "resprune", BUDGETS[name], options, selection_only=True)
    for s in record.samples:
        (ev,) = s.events
        want = 64 if name == "llava" else max(1, math.floor(0.3 * s.n_visual + 0.5))
        assert len(ev.keep_idx) == s.retained_tokens == want


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_selection_is_global_and_text_conditioned(name, tok):
    """One global selection per image over every candidate (NeXT: base + tiles, no newlines), equal to the pure
    functions on the ImageTokens the engine hands over; the question nouns change the selection."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    budget = BUDGETS[name]
    plans = {}
    for alpha in (0.0, 1.0):
        kw = {"tokenizer": tok} if alpha else {}
        vtprune.apply(model, "resprune", budget, alpha=alpha, **kw)
        try:
            seen = _captured(model)
            with torch.no_grad():
                model(**inputs)
            rec = vtprune.last_run(model)
        finally:
            vtprune.remove(model)
        assert len(seen) == 2
        for (image, k, plan), sample in zip(seen, rec.samples, strict=True):
            assert image.n == sample.n_visual  # newlines are not candidates
            if name == "llava_next":
                assert len(image.grids) >= 2 and len(image.crop.unique()) >= 2
            nouns = image.signals.get("noun_embeddings")
            assert (nouns is None) == (alpha == 0) and (nouns is None or nouns.shape[0] >= 2)
            w = text_relevance(image.features, nouns, alpha, 0.05)
            assert torch.equal(plan.keep_idx, residual_greedy(image.features, w, k)[0])
        plans[alpha] = [p.keep_idx for _, _, p in seen]
    assert any(not torch.equal(a, b) for a, b in zip(plans[0.0], plans[1.0], strict=True))
