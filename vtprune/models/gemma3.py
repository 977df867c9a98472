"""Adapter for `Gemma3ForConditionalGeneration`: SigLIP (no [CLS]) average-pooled to `mm_tokens_per_image`
(256) soft tokens per image, Gemma 3 decoder with interleaved sliding-window / full-attention layers.

- Layout: every image, and every pan-and-scan crop (the processor gives each crop its own
  `<start_of_image>` … `<end_of_image>` run), is one engine image with one side×side grid (16×16 for 256).
- Bidirectional image attention: the stock forward lets the soft tokens of one image (one contiguous run of
  `token_type_ids == 1`) attend to each other in both directions. Pre-LLM stages hand the stock forward the
  gathered `token_type_ids` (the engine gathers them with the ids), so every image's kept tokens form one
  block again and the rebuilt mask is the unpruned mask with the removed keys taken out — exactly.
- Sliding-window layers measure their window in sequence indices. Physically removing rows would let a
  sliding layer reach further back than in the unpruned model, so a pruned run is exact only while every
  position stays inside the window: prompts longer than `sliding_window` are refused at the prefill and a
  pruned generation that reaches the window is stopped (UnsupportedInputError naming the window). One
  256-token image, a question and the answer under Gemma 3's 1024-token window are exact.
- In-LLM stages (`llm:k`): the layers have two kinds (`layer_kind`: sliding / full attention) with their own
  RoPE tables (θ 10 k vs 1 M, linear scaling on the full layers of the real checkpoints) and masks, so every
  in-LLM group keeps one (cos, sin) and one mask per kind; the masks are rebuilt with the bidirectional
  blocks of the rows still present (`layer_mask(blocks=)`: each image's kept rows see each other both ways)
  and, on sliding layers, the window. Signals use Gemma's q/k norms and `query_pre_attn_scalar` scaling.
  `suffix_rope_gravity` (SparseVLM v2) is refused: no single RoPE table describes the model.
- Vision signals (spec §7 no-[CLS] rule): the last SigLIP layer's attention column mean (over heads and query
  patches of the same image), keys (all heads / head mean), each average-pooled with the projector's own
  kernel so they line up with the soft tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import hf_compat as hf
from ..errors import UnsupportedInputError
from .base import ModelAdapter, apply_rope


class Gemma3Adapter(ModelAdapter):
    model_classes = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    image_kwargs = ("pixel_values",)
    vision_signal_names = frozenset({"cls_attention", "vision_keys", "vision_head_keys"})

    @property
    def side(self) -> int:
        return int(round(int(self.model.config.mm_tokens_per_image) ** 0.5))

    def nominal_visual_tokens(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        window = self._window()
        if window is not None and input_ids.shape[1] > window:
            raise UnsupportedInputError(
                f"a prompt of {input_ids.shape[1]} tokens is longer than Gemma 3's sliding window ({window}): its "
                "sliding-window layers would reach different keys once rows are removed (supported up to the window)"
            )

    def check_decode(self, positions: torch.Tensor) -> None:
        window = self._window()
        if window is not None and int(positions.max()) >= window:
            raise UnsupportedInputError(
                f"generation reached position {int(positions.max())}, past Gemma 3's sliding window ({window}): "
                "its sliding-window layers would reach keys the unpruned model no longer sees (pruned generation "
                "is supported while prompt + generated tokens fit in the window)"
            )

    def _window(self) -> int | None:
        tc = self.text_config
        window = getattr(tc, "sliding_window", None)
        sliding = any(t == "sliding_attention" for t in getattr(tc, "layer_types", None) or ())
        return int(window) if sliding and window is not None else None

    def split_images(self, image_rows: torch.Tensor) -> list[torch.Tensor]:
        """Runs of soft tokens, each cut into images of `mm_tokens_per_image` (adjacent crops)."""
        n = self.nominal_visual_tokens()
        images = []
        for run in super().split_images(image_rows):
            if run.numel() % n:
                raise UnsupportedInputError(
                    f"a run of {run.numel()} image soft tokens is not a multiple of the {n} tokens per image"
                )
            images.extend(run.split(n))
        return images

    def image_layout(self, image_index: int, n: int):
        s = self.side
        if n != s * s:
            raise UnsupportedInputError(f"image {image_index} has {n} soft tokens, expected {s}×{s} = {s * s}")
        r = torch.arange(n)
        return [(s, s)], torch.stack([r // s, r % s], 1), torch.zeros(n, dtype=torch.long)

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(kwargs["pixel_values"], return_dict=True)
        return list(out.pooler_output)

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        out = mm.get("image")
        return None if out is None else list(out.pooler_output)

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """(k_i, D) per image -> one (1, Σ k_i, D) tensor (the model scatters it in placeholder order)."""
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(feats)[None])}

    # --- layer kinds, masks, attention -----------------------------------------------------------
    def layer_kind(self, layer_idx: int) -> str:
        return str(self.text_config.layer_types[layer_idx])

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None = None):
        """(cos, sin) of the RoPE table of layers of `kind` (Gemma 3 keeps one per layer type)."""
        return self.language_model.rotary_emb(hidden, position_ids, kind or "full_attention")

    def layer_mask(self, hidden: torch.Tensor, mask2d: torch.Tensor, cache, layer_idx: int, blocks=None):
        """Causal OR the bidirectional image blocks (rows of one image, `blocks` (B, L) image id or −1), AND the
        sliding window on sliding layers — the composition of the stock `create_masks_for_vision_model`."""
        window = self._window() if self.layer_kind(layer_idx) == "sliding_attention" else None
        return hf.causal_mask(self.text_config, hidden, mask2d, cache, layer_idx, **hf.block_overlays(blocks, window))

    def rotary_spec(self):
        """Refused: Gemma 3 has one RoPE table per layer type (and linear scaling on the full layers of the real
        checkpoints), which a single `RotarySpec` cannot describe (`suffix_rope_gravity`, SparseVLM v2)."""
        raise UnsupportedInputError(
            "Gemma 3 has one RoPE table per layer type (sliding / full attention), so suffix_rope_gravity "
            "(SparseVLM v2's RoPE gravity) is not supported on it; use sparsevlm version 1.5"
        )

    def input_norm(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.input_layernorm(hidden)

    def query_key_states(self, layer: nn.Module, hidden: torch.Tensor, pos_emb, rows: torch.Tensor, keys=None):
        """Post-RoPE queries of `rows` and keys of all rows, with Gemma 3's q/k norms and its scaling."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        bsz, length, _ = x.shape
        hd = attn.head_dim
        cos, sin = (t.expand(bsz, -1, -1) for t in pos_emb)
        xr = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        q = attn.q_norm(attn.q_proj(xr).view(bsz, rows.shape[1], -1, hd)).transpose(1, 2)
        idx = rows[..., None].expand(-1, -1, cos.shape[-1])
        q = apply_rope(q, cos.gather(1, idx), sin.gather(1, idx))
        if keys is None:
            k = attn.k_norm(attn.k_proj(x).view(bsz, length, -1, hd)).transpose(1, 2)
            keys = apply_rope(k, cos, sin)
        groups = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        return q, keys, float(attn.scaling)

    # --- vision signals (spec §7, no [CLS]) ------------------------------------------------------
    def vision_attention_module(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn

    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """x (n_img, P², C) the last SigLIP layer's attention input -> per image, pooled to the soft-token grid:
        cls_attention (n_img, n) column mean over heads and query patches (fp32), vision_keys (n_img, n, C),
        vision_head_keys (n_img, n, d_h)."""
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        k_flat = attn.k_proj(x)
        k = k_flat.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        col = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1).mean((1, 2))  # (b, P²)
        proj = self.model.model.multi_modal_projector
        side = proj.patches_per_image

        def pool(v: torch.Tensor) -> torch.Tensor:  # (b, P², c) -> (b, n, c), the projector's avg pool
            grid = v.transpose(1, 2).reshape(b, v.shape[-1], side, side)
            return proj.avg_pool(grid).flatten(2).transpose(1, 2)

        return {
            "cls_attention": pool(col[..., None])[..., 0],
            "vision_keys": pool(k_flat),
            "vision_head_keys": pool(k.mean(1)),
        }

    # --- family facts for applications -------------------------------------------------------------------
    def default_image_processor(self):
        """The PIL Gemma 3 image processor at the tower's size."""
        import transformers

        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else int(vc.image_size[0])
        return transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size})

    def prepare_inputs(self, texts: list[str], images: list, tokenizer, image_processor, processor=None) -> dict:
        """`<start_of_image>` + `mm_tokens_per_image` soft tokens + `<end_of_image>` per image and per pan-and-scan
        crop (`num_crops`); `token_type_ids` = 1 on soft tokens."""
        if not images:
            return super().prepare_inputs(texts, images, tokenizer, image_processor, processor)
        from .family_inputs import expand_placeholders, tokenize_with_images

        cfg = self.model.config
        image_id = self.image_token_id
        token_ids = tokenize_with_images(tokenizer, texts, image_id, len(images))
        pix = image_processor(images=images, return_tensors="pt")
        crops = [int(c) for c in pix.get("num_crops", [0] * len(images))]
        one = [int(cfg.boi_token_index)] + [image_id] * int(cfg.mm_tokens_per_image) + [int(cfg.eoi_token_index)]
        out = expand_placeholders(token_ids, image_id, [one * (1 + c) for c in crops])
        out["pixel_values"] = pix["pixel_values"]
        out["token_type_ids"] = (out["input_ids"] == image_id).long()
        return out

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One image per prompt: `mm_tokens_per_image` (256) soft tokens."""
        from . import synthetic

        return synthetic.gemma3_inputs(self.model, prompts, [1] * len(prompts), seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """side×side pooled soft tokens over the whole image (squashed to the square tile by the processor), then,
        with pan-and-scan, the same grid over each crop's part of the image (views "image" | "crops")."""
        from .display import Layout, original_view

        side = self.side
        view = original_view(image)
        crops = [(0.0, 0.0, float(view.width), float(view.height))]
        crops += gemma3_crops(image_processor, (view.height, view.width))
        got = int(inputs["pixel_values"].shape[0])
        if got != len(crops):
            raise UnsupportedInputError(
                f"Gemma 3 show: the inputs hold {got} images (image + pan-and-scan crops) but the image processor cuts "
                f"{len(crops)}; pass the image processor that made the inputs"
            )

        def box(crop: int, r: int, c: int):
            x0, y0, x1, y1 = crops[crop]
            cw, ch = (x1 - x0) / side, (y1 - y0) / side
            return x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch

        views, names = [view], ["image"]
        if len(crops) > 1:
            views, names = [view, view], ["image", f"pan-and-scan crops ({len(crops) - 1})"]
        return Layout("gemma3", [(side, side)] * len(crops), views, names, box, [0] + [1] * (len(crops) - 1))


def gemma3_crops(image_processor, image_size) -> list[tuple[float, float, float, float]]:
    """Gemma 3 pan-and-scan crops of an image of `image_size` (H, W), as the processor cuts them -> their boxes
    (x0, y0, x1, y1) on the image ([] when pan-and-scan is off or does not trigger)."""
    import numpy as np

    if not getattr(image_processor, "do_pan_and_scan", False):
        return []
    h, w = (int(v) for v in image_size)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))  # (2, H, W): each pixel's (y, x)
    crops = image_processor.pan_and_scan(
        grid,
        pan_and_scan_min_crop_size=image_processor.pan_and_scan_min_crop_size,
        pan_and_scan_max_num_crops=image_processor.pan_and_scan_max_num_crops,
        pan_and_scan_min_ratio_to_activate=image_processor.pan_and_scan_min_ratio_to_activate,
    )
    return [(float(c[1].min()), float(c[0].min()), float(c[1].max() + 1), float(c[0].max() + 1)) for c in crops]
