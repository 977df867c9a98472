"""Independent references for the engine oracles (written against the stock modules, not vtprune's engine).

`masked_reference_logits` runs the unpatched model as an explicit layer loop over the *full* sequence
with hand-built additive masks: a visual row removed at stage s is invisible as a key from that stage's
layer on. Same kept sets and same (original) positions => the pruned model must give the same logits
(spec README §11 property 4 and O2); fed prompt + generated tokens it is the no-cache reference of O3.
"""

from __future__ import annotations

import torch

import vtprune


def stage_layer(stage: str) -> int:
    return int(stage.split(":")[1]) if stage.startswith("llm:") else 0


def masked_reference_logits(
    model,
    inputs: dict,
    record: vtprune.RunRecord | None,
    new_tokens=None,
    replace: dict | None = None,
    positions: str = "keep",
) -> torch.Tensor:
    """(B, T, V) logits of the unpruned sequence (+ new_tokens) under per-layer key masking.

    replace: {(b, row): feature} overrides of image embeddings (merging methods).
    positions: "keep" (original ids) or "reindex" (a row's id at layer ℓ is its rank among the rows
    still present at ℓ, so ids are contiguous over the surviving sequence, generated tokens included).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if new_tokens is not None:
        ids = torch.cat([ids, new_tokens], 1)
        mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
    lm = model.model.language_model
    image_id = model.config.image_token_id
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
        emb = model.get_input_embeddings()(ids)
        emb[ids == image_id] = feats.to(emb.dtype)
        for (b, row), f in (replace or {}).items():
            emb[b, row] = f.to(emb.dtype)
        pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        n_layers = len(lm.layers)
        bsz, length = ids.shape
        key_ok = mask.bool()[None].repeat(n_layers, 1, 1)  # (n_layers, B, T)
        if record is not None:
            for b, sample in enumerate(record.samples):
                rows = (ids[b] == image_id).nonzero().flatten()
                for ev in sample.events:
                    gone = torch.ones(len(rows), dtype=torch.bool)
                    gone[ev.keep_idx] = False
                    key_ok[stage_layer(ev.stage) :, b, rows[gone]] = False
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        eye = torch.eye(length, dtype=torch.bool)
        h = emb
        cos_sin = lm.rotary_emb(h, position_ids=pos)
        neg = torch.finfo(h.dtype).min
        for layer_idx, layer in enumerate(lm.layers):
            if positions == "reindex":
                rank = (key_ok[layer_idx].long().cumsum(-1) - 1).clamp(min=0)
                cos_sin = lm.rotary_emb(h, position_ids=rank)
            allowed = (causal[None] & key_ok[layer_idx][:, None, :]) | eye[None]
            add = torch.zeros(bsz, 1, length, length, dtype=h.dtype).masked_fill(~allowed[:, None], neg)
            h = layer(h, attention_mask=add, position_embeddings=cos_sin, position_ids=pos)
        return model.lm_head(lm.norm(h))


def generate_logits(model, inputs: dict, steps: int):
    """Greedy cached generation -> (new tokens (B, steps), per-step logits (B, steps, V))."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[model.config.image_token_id],
        )
    prompt = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt:], torch.stack(out.logits, 1)
