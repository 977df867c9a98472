"""`ModelAdapter`: everything the engine needs to know about one model family, and nothing else.

The engine is written once against this interface and the transformers 5.x contracts (decoder-layer
call signature, `create_causal_mask(layer_idx=)`, `DynamicCache` layers, `mm_encoder_outputs`), reached through
`vtprune.hf_compat` wherever they differ between transformers releases.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import hf_compat as hf
from ..errors import UnsupportedInputError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): [-x2, x1] for the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE.  x (B, H, T, d_h), cos/sin (B, T, d_h) -> (B, H, T, d_h)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass(frozen=True)
class RotarySpec:
    """Rotary embedding of the language model's attention (plain RoPE: θ_i = theta^(−2i/head_dim), i < head_dim/2).

    sections: M-RoPE pair counts per position row (t, h, w), e.g. (16, 24, 24); None for 1-D RoPE.
    pair_rows: the position row of each rotary pair (head_dim/2 entries) when the layout is not the contiguous
    one `sections` describes (Qwen3-VL's interleaved M-RoPE); None: contiguous.
    """

    theta: float
    head_dim: int
    sections: tuple[int, ...] | None = None
    pair_rows: tuple[int, ...] | None = None


class ModelAdapter(ABC):
    """Per-family knowledge: module paths, image encoding, grids, positions, attention projections."""

    #: Class names of the HF models this adapter serves.
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: None for 1-D RoPE position ids (B, L); 3 for M-RoPE ids (3, B, L).
    position_rows: ClassVar[int | None] = None
    #: True when the image resolution sets the token count (Qwen2.5-VL): image resizing happens before the
    #: processor, so methods that are image transforms there (`downsample`) are refused with a pointer.
    dynamic_resolution: ClassVar[bool] = False
    #: kwargs of the top-level forward that carry raw images (dropped once features are passed).
    image_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: kwargs holding raw pixels `encode_images` can encode (one of them must be given when no features are).
    pixel_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose rows are visual (image, and e.g. video) tokens; default: the image id."""
        return (self.image_token_id,)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def nominal_visual_tokens(self) -> int | None:
        """Visual tokens per image when fixed by the architecture (LLaVA-1.5: 576), else None."""
        return None

    # --- images ----------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        """Run the vision tower + projector on the call's raw images.  -> [(n_i, D)] per image."""

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        """Per-image features passed as `mm_encoder_outputs` (as `generate` does), else None."""
        mm = kwargs.get("mm_encoder_outputs") or {}
        out = mm.get("image")
        return None if out is None else list(out.pooler_output)

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """The `mm_encoder_outputs` value that hands pruned features to the stock forward."""
        return {"image": BaseModelOutputWithPooling(pooler_output=feats)}

    def split_images(self, image_rows: torch.Tensor) -> list[torch.Tensor]:
        """Split one sample's image-placeholder row indices (ascending) into per-image index tensors.

        Default: contiguous runs of placeholders are images.
        """
        if image_rows.numel() == 0:
            return []
        breaks = (image_rows[1:] - image_rows[:-1] != 1).nonzero().flatten() + 1
        return list(torch.tensor_split(image_rows, breaks.tolist()))

    def check_stages(self, method_name: str, stages) -> None:
        """Refuse (raise `UnsupportedInputError`) a method whose stages this family cannot run; called at `apply`."""
        return None

    def check_decode(self, positions: torch.Tensor) -> None:
        """Refuse a decode step of a pruned cache (raise `UnsupportedInputError`); positions (B, q) or (R, B, q)
        are the step's position ids.  Default: nothing."""
        return None

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """Refuse inputs this family cannot prune (raise `UnsupportedInputError`); called at each prefill."""
        return None

    #: kwargs that `generate` consumes before the prefill but `image_layout` needs (remembered by the engine).
    layout_kwargs: ClassVar[tuple[str, ...]] = ()

    def begin_prefill(
        self,
        input_ids: torch.Tensor,
        mask2d: torch.Tensor,
        positions: torch.Tensor,
        image_rows: list[list[torch.Tensor]],
        kwargs: dict,
    ) -> list[list[torch.Tensor]] | None:
        """Called once per prefill before `image_layout`: original positions, each sample's image rows, and
        the call's kwargs (plus the `layout_kwargs` of the enclosing `generate` call).

        May return a refined split (per sample, the row-index tensors of its "images" in prompt order, e.g.
        a video cut into its temporal groups) that the engine then uses instead of `image_rows`."""
        return None

    def note_kept_rows(self, sources: list[torch.Tensor | None]) -> None:
        """Called by a `vision`/`pre_llm` stage right before `features_to_kwargs`: per image, the candidate index
        (k_i,) int64 behind each output token (−1 for a token the plan inserted), None for an unpruned image.
        Families with per-token side inputs (Qwen3-VL's DeepStack levels) prune them with it; default: nothing."""
        return None

    # --- per-row features the model adds inside the decoder (Qwen3-VL's DeepStack) -------------------------
    def injection_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the model adds per-visual-row features (default: none).  With
        in-LLM stages the engine takes them out of the stock loop (`take_injections`) and re-adds them on the
        rows still present (`inject`)."""
        return ()

    def injection_module(self) -> nn.Module:
        """The module whose call kwargs carry the injected features (default: the language model)."""
        return self.language_model

    def take_injections(self, kwargs: dict):
        """Pop the injected features from `injection_module`'s call kwargs; -> an opaque state or None."""
        return None

    def inject(self, state, layer_idx: int, hidden: torch.Tensor, lm_rows: torch.Tensor) -> torch.Tensor:
        """hidden (B, L', D) output of `layer_idx` with the features of the rows present added; lm_rows (B, L')
        the `injection_module` input row of each current row (−1 on padding)."""
        return hidden

    def candidate_mask(self, image_index: int, span: int) -> torch.Tensor | None:
        """(span,) bool: which placeholder rows of an image are visual tokens; the others are *structural*
        (kept like text by in-LLM stages, dropped with the image when a pre-LLM stage prunes it).
        None: every placeholder is a visual token."""
        return None

    def image_tiles(self, image_index: int) -> torch.Tensor | None:
        """(n,) int64 vision-encoder view of each candidate when one grid holds several views (LLaVA-NeXT's
        tiles), else None (each crop is one view)."""
        return None

    @abstractmethod
    def image_layout(self, image_index: int, n: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Grids of one image's n visual tokens: ([(h, w)] per crop, coords (n, 2), crop (n,))."""

    # --- vision signals --------------------------------------------------------------------------
    #: Names of the vision signals this family provides (see `vtprune.engine.signals.VISION_SIGNALS`).
    vision_signal_names: ClassVar[frozenset[str]] = frozenset()

    def vision_attention_module(self) -> nn.Module:
        """The vision self-attention whose input gives [CLS] attention and keys (spec §9)."""
        raise UnsupportedInputError(f"{type(self.model).__name__} exposes no vision [CLS] signal")

    def vision_hook_modules(self) -> list[nn.Module]:
        """Modules whose forward pre-hook feeds `vision_signals` (default: the one vision attention)."""
        return [self.vision_attention_module()]

    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None):
        """From the captured input of a `vision_hook_modules()` module: per-image signals, each either a
        tensor (n_img, n, ...) or a list of per-image tensors [(n_i, ...)]; None when nothing is captured."""
        raise UnsupportedInputError(f"{type(self.model).__name__} exposes no vision [CLS] signal")

    def vision_output_modules(self) -> list[nn.Module]:
        """Modules whose forward (post-)hook output feeds `vision_output_signals` (default: none)."""
        return []

    def vision_output_signals(self, module: nn.Module, output) -> dict | None:
        """From the output of a `vision_output_modules()` module: per-image signals shaped as in
        `vision_signals` (e.g. `vision_cls_features`, one row per view); None when nothing is captured."""
        return None

    def collate_vision_signals(self, captured: list[dict]) -> list[dict]:
        """The captures of one encoding (in call order) -> signals per image in prompt order, each lined up
        with that image's candidate visual tokens (`VIEW_SIGNALS`: one row per view).  Called at the prefill
        after `begin_prefill`, so an adapter may use the prefill's layout here (LLaVA-NeXT re-packs per-tile
        signals).  Default: as is."""
        return captured

    def project_vision(self, feats: torch.Tensor) -> torch.Tensor:
        """The model's token-wise projector: (k, C) vision-space rows (as `vision_features`) -> (k, D) LLM inputs.
        Adapters that list `vision_features` in `vision_signal_names` implement it."""
        raise UnsupportedInputError(
            f"{type(self.model).__name__} has no token-wise projector from vision features to LLM inputs"
        )

    # --- positions -------------------------------------------------------------------------------
    def original_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict):
        """Position ids of the unpruned prompt, as `generate` computes them.  -> (B, L) or (3, B, L).

        Explicit `position_ids` of the full prompt length are used as given."""
        given = kwargs.get("position_ids")
        if given is not None and given.shape[-1] == input_ids.shape[1]:
            return given
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()

    def reindex_positions(self, positions: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor):
        """`positions="reindex"`: contiguous ids over the surviving rows.  valid/visual (B, L')."""
        return (valid.long().cumsum(-1) - 1).clamp(min=0) * valid.long()

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None = None):
        """(cos, sin) for explicit position ids, as the language model computes them (for layers of `kind`)."""
        return hf.rotary_embeddings(self.language_model.rotary_emb, hidden, position_ids)

    def layer_kind(self, layer_idx: int) -> str | None:
        """The kind of a decoder layer when layers differ in mask and RoPE table (Gemma 3: "sliding_attention" /
        "full_attention"); None when all layers share them.  In-LLM groups keep one mask and one (cos, sin) per
        kind."""
        return None

    def layer_kinds(self) -> tuple[str | None, ...]:
        """Every `layer_kind` of the decoder, in first-use order (default: (None,))."""
        return tuple(dict.fromkeys(self.layer_kind(i) for i in range(self.num_layers)))

    def rotary_spec(self) -> RotarySpec:
        """The language model's rotary parameters, read from its config (`rope_parameters`, head_dim).

        Only unscaled RoPE (`rope_type="default"`, as LLaVA-1.5/NeXT and Qwen2.5-VL ship) is described; other
        `rope_type`s (linear, dynamic, yarn, llama3, ...) and partial rotary dims raise `UnsupportedInputError`,
        as does a model whose rotary module's `inv_freq` disagrees with θ_i = theta^(−2i/head_dim).
        """
        tc = self.text_config
        params = dict(getattr(tc, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedInputError(
                f"{type(self.model).__name__} uses rope_type={rope_type!r}; only unscaled RoPE (rope_type='default') "
                "is supported for signals that need the rotary frequencies (suffix_rope_gravity)"
            )
        theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", None))
        if theta is None or (partial is not None and float(partial) != 1.0):
            raise UnsupportedInputError(
                f"{type(self.model).__name__}: rotary config without rope_theta or with partial_rotary_factor="
                f"{partial} is not supported for suffix_rope_gravity"
            )
        spec = RotarySpec(float(theta), int(head_dim))
        inv = getattr(getattr(self.language_model, "rotary_emb", None), "inv_freq", None)
        if inv is not None:
            want = spec.theta ** (-2.0 * torch.arange(spec.head_dim // 2, dtype=torch.float64) / spec.head_dim)
            if inv.shape != want.shape or not torch.allclose(inv.double().cpu(), want, rtol=1e-5, atol=0.0):
                raise UnsupportedInputError(
                    f"{type(self.model).__name__}: the rotary module's inv_freq does not match "
                    f"theta={spec.theta:g}, head_dim={spec.head_dim} (unsupported RoPE variant)"
                )
        return spec

    # --- attention -------------------------------------------------------------------------------
    def layer_mask(self, hidden: torch.Tensor, mask2d: torch.Tensor, cache, layer_idx: int, blocks=None):
        """The attention mask a decoder layer expects for a group whose 2-D padding mask is `mask2d`.  blocks
        (B, L) int64: the image of each row (−1 for text), for families whose image tokens attend bidirectionally
        (default: ignored, causal)."""
        return hf.causal_mask(self.text_config, hidden, mask2d, cache, layer_idx)

    def input_norm(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A decoder layer's input normalisation (Llama-style `input_layernorm`).  hidden (B, L, D) -> (B, L, D)."""
        return layer.input_layernorm(hidden)

    def query_key_states(self, layer: nn.Module, hidden: torch.Tensor, pos_emb, rows: torch.Tensor, keys=None):
        """Post-RoPE queries of `rows` and keys of all positions for a Llama-style decoder layer.

        hidden (B, L, D) is the layer *input*; rows (B, q) int64; keys (B, H_kv, L, d_h) post-RoPE from the
        cache if available.  -> q (B, H, q, d_h), k (B, H, L, d_h) with KV heads repeated, scaling.
        """
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        bsz, length, _ = x.shape
        hd = attn.head_dim
        cos, sin = (t.expand(bsz, -1, -1) for t in pos_emb)  # the model may pass (1, L, d_h)
        xr = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        q = attn.q_proj(xr).view(bsz, rows.shape[1], -1, hd).transpose(1, 2)
        idx = rows[..., None].expand(-1, -1, cos.shape[-1])
        q = apply_rope(q, cos.gather(1, idx), sin.gather(1, idx))
        if keys is None:
            k = attn.k_proj(x).view(bsz, length, -1, hd).transpose(1, 2)
            keys = apply_rope(k, cos, sin)
        groups = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        return q, keys, float(attn.scaling)

    # --- family facts for applications (loading, prompts, inputs, display, RCP training) ------------------
    #: HF `model_type`s served (how a saved directory's config.json finds its adapter and model class).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: True when the HF processor object builds this family's inputs (`prepare_inputs`); False when vtprune
    #: builds them from the tokenizer + a PIL image processor (processors that need torchvision).
    uses_processor: ClassVar[bool] = False
    #: Special tokens of the placeholder tokenizer of a model without one (`arch:`): config attribute -> text.
    placeholder_tokens: ClassVar[dict[str, str]] = {"image_token_id": "<image>"}
    #: True when RCP's mask route (`vtprune.rcp.mask_route`, training) supports this family.
    rcp_mask_route: ClassVar[bool] = False

    @property
    def family(self) -> str:
        """The family's name (its HF `model_type`, e.g. "llava_next")."""
        return str(self.model.config.model_type)

    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head (vision tower + projector + language model)."""
        return self.model.model

    def image_token_text(self, tokenizer) -> str:
        """The tokenizer's text of the image placeholder (one per image in a prompt)."""
        return tokenizer.convert_ids_to_tokens(self.image_token_id)

    def default_prompt(self, tokenizer, text: str, n_images: int = 1) -> str:
        """The prompt for a processor / tokenizer without a chat template: `n_images` placeholders, then `text`.
        Default (LLaVA): `USER: <image>\\n{text} ASSISTANT:`."""
        return "USER: " + f"{self.image_token_text(tokenizer)}\n" * n_images + f"{text} ASSISTANT:"

    def make_processor(self, tokenizer, image_processor):
        """The HF processor object built from a tokenizer and an image processor (families with
        `uses_processor`), else None."""
        return None

    def default_image_processor(self):
        """A PIL image processor for a model saved without one (`arch:` models), from the model's config."""
        raise UnsupportedInputError(f"{type(self.model).__name__}: no default image processor")

    def prepare_inputs(self, texts: list[str], images: list, tokenizer, image_processor, processor=None) -> dict:
        """Texts (one placeholder per image, `prompt` gives them) + PIL images (in order, sample after sample)
        -> left-padded model inputs on the CPU: {input_ids (B, L), attention_mask (B, L), pixel_values, ...}.
        Default: the HF processor (families with `uses_processor`), the tokenizer alone without images."""
        if not images:
            return dict(tokenizer(texts, return_tensors="pt", padding=True))
        if processor is None:
            processor = self.make_processor(tokenizer, image_processor)
        if processor is None:
            raise UnsupportedInputError(f"{type(self.model).__name__}: building inputs needs the model's processor")
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    def synthetic_inputs(
        self, prompts: list[tuple[list[int], list[int]]], image_size: tuple[int, int] | None = None, seed: int = 0
    ) -> dict:
        """Random pixels and one image between each (prefix ids, suffix ids) prompt (`vtprune bench`).
        image_size: (W, H) px where the family's token count depends on it (None: the family's default)."""
        raise UnsupportedInputError(f"{type(self.model).__name__}: no synthetic inputs (vtprune bench)")

    def display_layout(self, image, inputs: dict, image_processor):
        """Where the candidates of the single image of `inputs` lie on that image (`vtprune show`):
        a `vtprune.models.display.Layout`."""
        raise UnsupportedInputError(f"{type(self.model).__name__}: no display layout for vtprune show")
