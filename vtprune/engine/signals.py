"""Signals shared by methods, computed without `output_attentions` (spec README §9).

- LLM attention of chosen query rows, recomputed from the layer input (or the layer's cached keys):
  O(rows · n · H · d_h), never an n×n map except chunked for `mean_received`.
- Key L2 norms of the head-averaged post-RoPE keys (ViTCoP; RoPE does not change the norm).
- Vision [CLS]→patch attention and keys are captured by a pre-hook on one vision attention module
  (see `ModelAdapter.vision_signals`).
"""

from __future__ import annotations

import torch
from torch import nn

#: Signals an `llm:k` stage can request, computed from layer k−1 (per image, over its n current candidates):
#: last_token_attention (n,), mean_received_attention (n,), key_norms (n,), and
#: suffix_attention (T_s, n): head-mean attention of each question-span row (see TEXT_SIGNALS) over them;
#: layer_last_token_attention (n,): the last prompt token's row at layer k *itself*, from the hidden states
#: entering layer k (its norm, q/k projections and RoPE; keys recomputed: T·D·H_kv·d_h MACs) — PDrop;
#: suffix_attention_heads (H, T_s, n): the same rows as suffix_attention per query head (KV heads repeated for
#: GQA), from the same computation (asking for both computes the attention once; head mean = suffix_attention);
#: suffix_rope_gravity (T_s, n): `rope_gravity` of each question-span row's and candidate's position ids at
#: layer k−1 (the RoPE-only logit of all-ones query/key vectors; M-RoPE per section) — SparseVLM+.
#: In-layer signals (`OWN_LAYER_SIGNALS`), all from the hidden states entering layer k *itself* (before the
#: stage's rows are removed; no eager attention, keys recomputed), for in-layer decisions (RCP):
#: layer_suffix_attention (T_s, n): head-mean post-softmax attention of the question-span rows (the rows of
#: `suffix_attention`) over the candidates at layer k;
#: layer_normed_features (n, D): layer k's `input_layernorm` of the candidates' rows (fp32);
#: layer_normed_suffix (T_s, D): the same normalised rows of the question span (fp32; per sample, not per
#: candidate).
LLM_SIGNALS = frozenset(
    {
        "last_token_attention",
        "mean_received_attention",
        "key_norms",
        "suffix_attention",
        "layer_last_token_attention",
        "suffix_attention_heads",
        "suffix_rope_gravity",
        "layer_suffix_attention",
        "layer_normed_features",
        "layer_normed_suffix",
    }
)
#: LLM signals computed from layer k's own input (no capture of layer k−1; allowed at `llm:0`).
OWN_LAYER_SIGNALS = frozenset(
    {"layer_last_token_attention", "layer_suffix_attention", "layer_normed_features", "layer_normed_suffix"}
)
#: LLM signals with one row per candidate on dim 0 ((n, D)) instead of the last dim.
ROW_SIGNALS = frozenset({"layer_normed_features"})
#: LLM signals per sample (not indexed by candidate).
SAMPLE_SIGNALS = frozenset({"layer_normed_suffix"})
#: LLM signals that need the question-span rows.
SUFFIX_SIGNALS = frozenset(
    {
        "suffix_attention",
        "suffix_attention_heads",
        "suffix_rope_gravity",
        "layer_suffix_attention",
        "layer_normed_suffix",
    }
)
#: Signals a `vision`/`pre_llm` stage can request, captured from the vision tower (per image, n candidates):
#: cls_attention (n,) [CLS]→patch attention, head mean (Qwen: spec §7 column mean);
#: vision_keys (n, C) keys of that layer, heads not split; vision_head_keys (n, d_h) head-mean keys;
#: vision_features (n, C) the projector's input (pre-projector patch features; LLaVA families only; such
#: adapters also hand `ImageTokens.project`, the projector, to vision/pre_llm stages);
#: vision_cls_features (V, C) per vision *view*, not per candidate: the [CLS] row of that CLIP layer's output
#: (pre-projector, like vision_features), row v for view v (`ImageTokens.view`: LLaVA-1.5 one row; LLaVA-NeXT
#: row 0 the base view, row 1 + t anyres tile t, one per tile the tower ran, also tiles unpadding removed);
#: only where the [CLS] is no candidate (LLaVA families, vision_feature_select_strategy="default").
VISION_SIGNALS = frozenset(
    {"cls_attention", "vision_keys", "vision_head_keys", "vision_features", "vision_cls_features"}
)
#: Vision signals with one row per vision view (indexed by `ImageTokens.view`) instead of one per candidate.
VIEW_SIGNALS = frozenset({"vision_cls_features"})
#: Signals any stage can request, from the prompt's LLM input embeddings (fp32), per image:
#: question_embeddings (T_q, D) user-question tokens (text after the sample's last image, no special
#: tokens, no generation header when a tokenizer is known); suffix_embeddings (T_s, D) every token of the
#: question span (template tail included); noun_embeddings (n_nouns, D) mean sub-word embeddings of the
#: question's nouns (needs a tokenizer; (0, D) when there are none); visual_embeddings (n, D) the current
#: candidates' rows of the layer-0 input; question_text: sets `ImageTokens.question` (needs a tokenizer).
TEXT_SIGNALS = frozenset(
    {"question_embeddings", "suffix_embeddings", "noun_embeddings", "visual_embeddings", "question_text"}
)


def _masked_head_probs(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over keys in fp32 with invisible keys removed, per head.

    scores (B, H, q, L), visible (B, q, L) bool -> (B, H, q, L).
    """
    scores = scores.float().masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0)


def _masked_probs(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`_masked_head_probs` averaged over heads.  scores (B, H, q, L), visible (B, q, L) bool -> (B, q, L)."""
    return _masked_head_probs(scores, visible).mean(1)


def attention_rows(adapter, layer: nn.Module, hidden, pos_emb, mask2d, rows, keys=None, heads=False) -> torch.Tensor:
    """Head-averaged attention probabilities of query `rows` over all positions at `layer`.

    hidden (B, L, D): input of the layer; pos_emb: its (cos, sin) (B, L, d_h); mask2d (B, L) padding
    mask; rows (B, q) int64 query positions; keys: the layer's post-RoPE cached keys (B, H_kv, L, d_h)
    or None to recompute.  -> (B, q, L) fp32; causal (a row sees keys at or before it).
    heads=True: per query head (KV heads repeated for GQA) instead of the mean.  -> (B, H, q, L) fp32.
    """
    q, k, scaling = adapter.query_key_states(layer, hidden, pos_emb, rows, keys)
    length = hidden.shape[1]
    visible = mask2d.bool()[:, None, :] & (torch.arange(length, device=rows.device)[None, None] <= rows[..., None])
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    return _masked_head_probs(scores, visible) if heads else _masked_probs(scores, visible)


def last_token_attention(adapter, layer, hidden, pos_emb, mask2d, keys=None) -> torch.Tensor:
    """Attention row of the last prompt token (left padding: the last row).  -> (B, L) fp32."""
    rows = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    return attention_rows(adapter, layer, hidden, pos_emb, mask2d, rows, keys)[:, 0]


def mean_received_attention(adapter, layer, hidden, pos_emb, mask2d, keys=None, chunk: int = 256) -> torch.Tensor:
    """Mean attention each key receives from the valid query rows that can see it (FastV paper text).

    a_j = Σ_{i ≥ j, valid} A[i, j] / #{valid i ≥ j}; computed in chunks of query rows.  -> (B, L) fp32.
    """
    bsz, length, _ = hidden.shape
    total = torch.zeros(bsz, length, dtype=torch.float32, device=hidden.device)
    for start in range(0, length, chunk):
        rows = torch.arange(start, min(start + chunk, length), device=hidden.device).expand(bsz, -1)
        probs = attention_rows(adapter, layer, hidden, pos_emb, mask2d, rows, keys)  # (B, q, L)
        total += (probs * mask2d[:, start : start + rows.shape[1], None].float()).sum(1)
    valid = mask2d.float()
    seen_by = valid.flip(1).cumsum(1).flip(1)  # number of valid rows i >= j
    return total / seen_by.clamp(min=1.0)


def rows_attention(adapter, layer, hidden, pos_emb, mask2d, rows, rows_valid, keys=None, heads=False) -> torch.Tensor:
    """Attention of per-sample query rows (padded to a common count).  rows/rows_valid (B, q) -> (B, q, L), or
    (B, H, q, L) per head with heads=True; padded query slots (rows_valid False) are zero."""
    probs = attention_rows(adapter, layer, hidden, pos_emb, mask2d, rows, keys, heads)
    valid = rows_valid[..., None].float()
    return probs * (valid[:, None] if heads else valid)


def rope_gravity(
    rows_pos: torch.Tensor, cols_pos: torch.Tensor, theta: float, head_dim: int, sections=None, pair_rows=None
) -> torch.Tensor:
    """RoPE-only attention logit of all-ones query/key vectors (SparseVLM+ "gravity"), per position pair:

    `W[p, q] = (2/√d_h) · Σ_{i<d_h/2} cos((p_{s(i)} − q_{s(i)})·θ_i)`, θ_i = theta^(−2i/d_h), where s(i) is the
    position row of rotary pair i: 0 for 1-D RoPE; M-RoPE: the first sections[0] pairs use row 0 (t), the next
    sections[1] row 1 (h), ... (transformers' `mrope_section` layout); pair_rows (d_h/2 ints), when given, is s(i)
    itself (interleaved layouts such as Qwen3-VL's).
    rows_pos (q,) | (R, q), cols_pos (L,) | (R, L) position ids -> (q, L) fp32 (angles and sums in fp64).
    """
    device = rows_pos.device if rows_pos.device.type != "mps" else torch.device("cpu")  # no fp64 on MPS
    half = head_dim // 2
    inv = float(theta) ** (-2.0 * torch.arange(half, dtype=torch.float64, device=device) / head_dim)  # (d_h/2,)
    p = rows_pos.to(device, torch.float64).reshape(-1, rows_pos.shape[-1])  # (R, q)
    c = cols_pos.to(device, torch.float64).reshape(-1, cols_pos.shape[-1])  # (R, L)
    if pair_rows is not None:
        if len(pair_rows) != half:
            raise ValueError(f"pair_rows has {len(pair_rows)} entries, expected head_dim/2 = {half}")
        row = torch.tensor(list(pair_rows), dtype=torch.long, device=device) % p.shape[0]
    elif sections is None:
        row = torch.zeros(half, dtype=torch.long, device=device)
    else:
        if sum(sections) != half:
            raise ValueError(f"M-RoPE sections {tuple(sections)} do not sum to head_dim/2 = {half}")
        counts = torch.tensor(list(sections), device=device)
        row = torch.arange(len(sections), device=device).repeat_interleave(counts) % p.shape[0]
    a_p = p[row].T * inv  # (q, d_h/2) angle of pair i at each row's position
    a_c = c[row].T * inv  # (L, d_h/2)
    w = a_p.cos() @ a_c.cos().T + a_p.sin() @ a_c.sin().T  # Σ_i cos(a_p − a_c)
    return (w * (2.0 / head_dim**0.5)).float().to(rows_pos.device)


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """L2 norm of the head-averaged key of every position.  keys (B, H_kv, L, d_h) -> (B, L) fp32."""
    return keys.float().mean(1).norm(dim=-1)
