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
    qwen = "image_grid_thw" in inputs
    with torch.no_grad():
        if qwen:
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        elif "image_sizes" in inputs:  # LLaVA-NeXT / OneVision: packed base + unpadded tiles + newlines
            extra = {k: inputs[k] for k in ("batch_num_images",) if k in inputs}
            out = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], **extra
            )
        else:
            out = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        feats = torch.cat(list(out.pooler_output))
        # Qwen3-VL DeepStack: level j is added to every image row after decoder layer j (pruned rows are
        # invisible as keys from their stage on, so adding to them changes nothing the kept rows see)
        deepstack = [torch.cat(list(level)) for level in getattr(out, "deepstack_features", None) or ()]
        emb = model.get_input_embeddings()(ids)
        emb[ids == image_id] = feats.to(emb.dtype)
        for (b, row), f in (replace or {}).items():
            emb[b, row] = f.to(emb.dtype)
        if qwen:  # the stock M-RoPE ids of the whole (prompt + generated) sequence
            tt = (ids == image_id).long()
            pos, _ = model.model.get_rope_index(
                ids, mm_token_type_ids=tt, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
            )
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        n_layers = len(lm.layers)
        bsz, length = ids.shape
        key_ok = mask.bool()[None].repeat(n_layers, 1, 1)  # (n_layers, B, T)
        newline = getattr(model.model, "image_newline", None)
        if record is not None:
            for b, sample in enumerate(record.samples):
                rows = (ids[b] == image_id).nonzero().flatten()
                structural = torch.zeros(len(rows), dtype=torch.bool)
                if newline is not None:  # NeXT newline rows are not candidates (spec §8)
                    structural = (emb[b, rows] == newline.to(emb.dtype)).all(-1)
                visual = rows[~structural]
                for ev in sample.events:
                    gone = torch.ones(len(visual), dtype=torch.bool)
                    gone[ev.keep_idx] = False
                    key_ok[stage_layer(ev.stage) :, b, visual[gone]] = False
                    if gone.any() and not ev.stage.startswith("llm:"):  # pre-LLM pruning drops newlines
                        key_ok[:, b, rows[structural]] = False
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        eye = torch.eye(length, dtype=torch.bool)
        h = emb
        # Gemma 3: one RoPE table per layer type, image runs attend bidirectionally, sliding layers keep a window
        kinds = getattr(lm.config, "layer_types", None) if "token_type_ids" in inputs else None
        if kinds is not None:
            img = ids == image_id
            run = torch.where(img, (img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]).long().cumsum(1), -1)
            causal = causal[None] | ((run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0))
            window = torch.arange(length)[None, :] > torch.arange(length)[:, None] - lm.config.sliding_window
        cos_sin = lm.rotary_emb(h, position_ids=pos) if kinds is None else None
        neg = torch.finfo(h.dtype).min
        for layer_idx, layer in enumerate(lm.layers):
            layer_pos = pos
            if positions == "reindex":
                if qwen:
                    layer_pos = _qwen_reindex(pos, key_ok[layer_idx], ids == image_id)
                else:
                    layer_pos = (key_ok[layer_idx].long().cumsum(-1) - 1).clamp(min=0)
                cos_sin = lm.rotary_emb(h, position_ids=layer_pos) if kinds is None else None
            if kinds is not None:
                cos_sin = lm.rotary_emb(h, layer_pos, kinds[layer_idx])
                seen = causal & (window if kinds[layer_idx] == "sliding_attention" else True)
                allowed = (seen & key_ok[layer_idx][:, None, :]) | eye[None]
            else:
                allowed = (causal[None] & key_ok[layer_idx][:, None, :]) | eye[None]
            add = torch.zeros(bsz, 1, length, length, dtype=h.dtype).masked_fill(~allowed[:, None], neg)
            h = layer(h, attention_mask=add, position_embeddings=cos_sin, position_ids=None if qwen else pos)
            if layer_idx < len(deepstack):
                h = h.clone()
                h[ids == image_id] = h[ids == image_id] + deepstack[layer_idx].to(h.dtype)
        return model.lm_head(lm.norm(h))


def _qwen_reindex(pos: torch.Tensor, present: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """Spec §6 `reindex` for M-RoPE, walked row by row: image rows keep their 3-D ids, each present text
    row gets max(previous text id + 1, largest earlier image id + 1).  pos (3, B, T) -> (3, B, T)."""
    out = pos.clone()
    for b in range(pos.shape[1]):
        nxt = 0
        for t in range(pos.shape[2]):
            if not present[b, t]:
                continue
            if is_image[b, t]:
                nxt = max(nxt, int(pos[:, b, t].max()) + 1)
            else:
                out[:, b, t] = nxt
                nxt += 1
    return out


def generate_logits(model, inputs: dict, steps: int):
    """Greedy cached generation -> (new tokens (B, steps), per-step logits (B, steps, V))."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[model.config.image_token_id, *_extra_special(model)],
        )
    prompt = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt:], torch.stack(out.logits, 1)


def _extra_special(model) -> list[int]:
    """Vision special tokens a random model must not generate (they would change the stock positions)."""
    cfg = model.config
    names = ("video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None]
