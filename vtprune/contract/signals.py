"""Names of the signals a method can request (`PruningMethod.signals`) and their shapes.

The engine computes them (`vtprune.engine.signals`); adapters say which vision signals a family provides.
Plain names only: this module imports nothing.
"""

from __future__ import annotations

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
