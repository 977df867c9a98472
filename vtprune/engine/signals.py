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

from ..contract.signals import (  # noqa: F401  (re-exported: the engine computes these)
    LLM_SIGNALS,
    OWN_LAYER_SIGNALS,
    ROW_SIGNALS,
    SAMPLE_SIGNALS,
    SUFFIX_SIGNALS,
    TEXT_SIGNALS,
    VIEW_SIGNALS,
    VISION_SIGNALS,
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
