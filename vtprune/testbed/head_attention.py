"""One decoder head's attention at chosen query positions, recomputed from the layer's input, and the cross-entropy
of a target distribution against it: the machinery of the training-only attention targets (`count_attention.py`,
`fetch_attention.py`).

Nothing here has parameters: it reads the layer's own query / key projections (the gradient reaches them and what
feeds them, never the value projection or a later layer), so the shipped model stays a stock
`LlavaForConditionalGeneration`. Llama-family decoders only (`q_proj`, `k_proj`, rotary position embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def head_log_attention(model, layer: int, head: int | torch.Tensor, layer_input: torch.Tensor,
                       position_ids: torch.Tensor | None, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[K, T] log attention of head `head` (one for every query, or [K]: one per query) of decoder layer `layer`
    (1-based) at each query (rows[k], pos[k]) over its row's T keys (-inf past the query: causal). layer_input
    [B, T, D]: `hidden_states[layer - 1]`; position_ids [B, T] (None: 0..T-1). Padding keys are not masked: every
    query comes before its row's padding."""
    block = model.model.language_model.layers[layer - 1]
    attn = block.self_attn
    cfg = model.config.text_config
    head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    heads = torch.as_tensor(head, device=layer_input.device).expand(rows.numel())  # [K]
    kv_heads = heads // (cfg.num_attention_heads // cfg.num_key_value_heads)  # [K]
    b, t, _ = layer_input.shape
    x = block.input_layernorm(layer_input)  # [B, T, D]
    if position_ids is None:
        position_ids = torch.arange(t, device=x.device).expand(b, -1)
    cos, sin = model.model.language_model.rotary_emb(x, position_ids)  # [B, T, hd] each
    query = torch.arange(rows.numel(), device=x.device)
    q = attn.q_proj(x[rows, pos]).view(-1, cfg.num_attention_heads, head_dim)[query, heads]  # [K, hd]
    k = attn.k_proj(x[rows]).view(rows.numel(), t, -1, head_dim)[query, :, kv_heads]  # [K, T, hd]
    q, _ = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], cos[rows, pos][:, None], sin[rows, pos][:, None])
    k, _ = apply_rotary_pos_emb(k[:, None], k[:, None], cos[rows], sin[rows])
    logits = (k[:, 0] @ q[:, 0, 0].unsqueeze(-1)).squeeze(-1).float() * head_dim ** -0.5  # [K, T]
    causal = torch.arange(t, device=x.device)[None] <= pos[:, None]  # [K, T]
    return F.log_softmax(logits.masked_fill(~causal, float("-inf")), -1)


def target_cross_entropy(logp: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mean cross-entropy of `target` against exp(logp), mean attention mass on the target's support); logp and
    target [K, T], each target row a distribution over keys the query can see."""
    loss = -(target * logp.nan_to_num(neginf=0.0)).sum(-1).mean()
    mass = (logp.exp() * (target > 0)).sum(-1).mean().item()
    return loss, mass


def image_token_values(values: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                       patch_index: torch.Tensor) -> torch.Tensor:
    """[B, T, C]: per-patch values [B, 576, C] placed at the image tokens that show each patch (patch_index [B, N]:
    which patch each of the row's N image tokens is), zero at every other token."""
    b, t = input_ids.shape
    image = input_ids == image_token_id  # [B, T]
    out = torch.zeros(b, t, values.shape[-1], device=input_ids.device)
    shown = values.to(input_ids.device).float().gather(1, patch_index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    out[image] = shown.reshape(-1, values.shape[-1])  # [B, N, C]: every row shows N image tokens
    return out
