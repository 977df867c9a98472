"""The one place for the tests' shared factories: tiny models, prompts, image sizes, hand-built `ImageTokens`.

Tiny models: `tiny(kind, **options)` builds each (kind, options) once per test session and hands every later
caller the same instance (the `models` / `batches` fixtures of conftest.py and `families.family(...)` come from
it too). A test that uses a shared model must leave it as it found it: patch it only through `vtprune.apply` /
`vtprune.pruned` and remove the patch (also on failure), and never change its dtype, attention implementation,
config or weights. A test that has to change the model builds its own with `vtprune.testing` directly.
"""

from __future__ import annotations

from functools import cache

import torch

from vtprune import testing
from vtprune.methods import ImageTokens

#: kind -> the `vtprune.testing` builder
BUILDERS = {
    "llava": testing.tiny_llava,
    "llava_next": testing.tiny_llava_next,
    "qwen2_5_vl": testing.tiny_qwen2_5_vl,
    "qwen3_vl": testing.tiny_qwen3_vl,
    "llava_onevision": testing.tiny_llava_onevision,
    "gemma3": testing.tiny_gemma3,
    "internvl": testing.tiny_internvl,
}


def tiny(kind: str, **options):
    """The session's shared tiny model of `kind` built with `options` (keywords of its `vtprune.testing` builder,
    which refuses unknown ones): one instance per (kind, options) per test session. See the module docstring
    for what a test may do with it."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {tuple(BUILDERS)}")
    return _build(kind, tuple(sorted(options.items())))


@cache
def _build(kind: str, options: tuple):
    torch.set_num_threads(1)
    return BUILDERS[kind](**dict(options))


# --- prompts and image sizes ------------------------------------------------------------------------------
#: two (prefix ids, suffix ids) prompts of different lengths (the batch of two is left padded); a batch of one
#: is PROMPTS[:1]
PROMPTS = [([1, 5, 6], [7, 8, 9, 10]), ([1, 2], [17, 18, 19, 20, 21, 22, 23])]
NEXT_SIZES = [(100, 160), (112, 60)]  # LLaVA-NeXT: 16 base + 6×8 = 64 and 16 + 8×4 = 48 (+ 6 and 8 newlines)
QWEN_SIZES = [(112, 168), (84, 112)]  # Qwen2.5-VL: merged grids 4×6 = 24 and 3×4 = 12 tokens
QWEN3_SIZES = [(128, 192), (96, 128)]  # Qwen3-VL: 24 and 12 visual tokens (32 px per token)
# OneVision: 16 + 8×12 (+ 8 newlines) and 16 + 12×12 after anyres_max_9 shrinks 16×16 (+ 12 newlines)
ONEVISION_SIZES = [[(100, 160)], [(224, 224)]]
INTERNVL_TILES = [1, 3]  # tiles per image (2 dynamic tiles + thumbnail), 16 tokens each
GEMMA_CROPS = [1, 3]  # images per prompt (an image + 2 pan-and-scan crops), 16 soft tokens each


# --- hand-built ImageTokens (method unit tests) -------------------------------------------------------------
def grid_layout(grids) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Raster coordinates (n, 2) and crop ids (n,) of candidates on crops of the given (h, w) grids, and n."""
    coords, crop = [], []
    for c, (h, w) in enumerate(grids):
        r = torch.arange(h * w)
        coords.append(torch.stack([r // w, r % w], 1))
        crop.append(torch.full((h * w,), c, dtype=torch.long))
    return torch.cat(coords), torch.cat(crop), sum(h * w for h, w in grids)


def image_tokens(
    grids=((24, 24),),
    *,
    n: int | None = None,
    d: int = 16,
    seed: int = 0,
    feats: torch.Tensor | None = None,
    signals: dict | None = None,
    **extra,
) -> ImageTokens:
    """`ImageTokens` of one image whose candidates fill the crops `grids` in raster order (crop ids 0, 1, ...),
    features `feats` or, when None, (n, d) normal draws from a generator seeded with `seed` (the image's seed
    too), `signals` as given; `extra` goes to `ImageTokens` (tile=, project=, question=, ...).

    n: a candidate count on one crop that need not fill it: the first n raster positions of grids[0] (rows of
    its width; the grid is recorded as given)."""
    if n is None:
        coords, crop, n = grid_layout(grids)
    else:
        (_, w), r = grids[0], torch.arange(n)
        coords, crop = torch.stack([r // w, r % w], 1), torch.zeros(n, dtype=torch.long)
    if feats is None:
        feats = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return ImageTokens(feats, coords, crop, list(grids), torch.arange(n), signals or {}, seed, **extra)


def tiny_testbed_size(text_layers: int, **widths):
    """A built-in-benchmark model size with every width tiny (32, MLP 64, 2 heads, 2 vision layers) and
    `text_layers` decoder layers; `widths` overrides any field of `vtprune.testbed.ModelSize`."""
    from vtprune.testbed import ModelSize

    tiny_widths = dict(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=32, text_heads=2,
                       text_mlp=64)  # fmt: skip
    return ModelSize(**{**tiny_widths, "text_layers": text_layers, **widths})


def tiny_v3_train_config(**overrides):
    """A shapes-v3 `TrainConfig` for trainer smoke tests: the TINY_V3 size, one Stage-A step, batches of 2 scenes
    with 3 questions each, no keep schedule, no Stage C; `overrides` sets the steps and the feature under test."""
    from dataclasses import replace

    from vtprune.testbed.train_v3 import TINY_V3, v3_config

    smoke = dict(steps_a=1, batch_a=2, batch_b=2, questions_per_image=3, warmup=1, eval_per_type=1, keep_schedule="",
                 probe_scenes=4, feature_cache=4, cls_steps=0, single_steps=0, type_schedule="")  # fmt: skip
    return replace(v3_config(size=TINY_V3), **{**smoke, **overrides})


def train_restoring_threads(out, cfg, log=lambda _: None):
    """`vtprune.testbed.train.train(out, cfg)` without a progress bar, the test process's torch thread count restored
    afterwards (the trainer sets its own)."""
    from vtprune.testbed.train import train

    threads = torch.get_num_threads()
    try:
        return train(out, cfg, progress=False, log=log)
    finally:
        torch.set_num_threads(threads)


def logged_step_values(out, cfg, marker: str) -> dict[str, str]:
    """Train `cfg` (a 25-step tiny run) into `out` and return its one logged Stage-B step line holding `marker`
    as {name: value} for each "name value" pair after the step and the wall time."""
    logs: list[str] = []
    train_restoring_threads(out, cfg, logs.append)
    lines = [x for x in logs if x.startswith("B ") and marker in x]
    assert len(lines) == 1, logs  # logged every 25 steps
    words = lines[0].split()[3:]
    return dict(zip(words[::2], words[1::2], strict=False))


def decoder_attentions(model, feats: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A testbed model's decoder attentions per layer ([B, H, T, T] each; the model set to eager attention) with
    `feats` [B, N, Dv] (vision features) at the image tokens: the reference the attention targets are checked on."""
    embeds = model.model.language_model.get_input_embeddings()(input_ids)
    image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image.unsqueeze(-1), model.model.multi_modal_projector(feats))
    return model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      output_attentions=True).attentions
