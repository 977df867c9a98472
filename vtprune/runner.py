"""`vtprune run`: one image + one prompt through a (pruned) model -> answer, token counts, FLOPs, timing.

    loaded = load("builtin:shapes-llava")                     # or a local directory, or "arch:llava-1.5-7b"
    result = run_one(loaded, Image.open("cat.png"), "What is shown?", "fastv", 64)
    result["answer"], result["retained_tokens"], result["flops"]["exact"], result["prefill_ms"]

Models come from
- ``builtin:NAME``: a checkpoint shipped in ``vtprune/assets`` (model + processor);
- a local directory saved with ``save_pretrained`` (``local_files_only=True``): the model class from its
  ``model_type``; the processor from ``AutoProcessor``, or, where that cannot be built (Qwen2.5-VL's needs
  torchvision), the directory's tokenizer + PIL image processor; the testbed processor as a last resort
  for LLaVA checkpoints with the testbed vocabulary;
- ``arch:NAME``: a real architecture with *random weights* (see ``vtprune.measurement.arch``) and a
  placeholder word-level tokenizer (every word of the prompt is ``<unk>``): the answer is noise; the
  token counts, FLOPs and timings are real. ``Loaded.note`` says so.

Timings are one call (no warm-up, no repeats): ``prefill_ms`` is the language model's prefill (decoder
layers, in-LLM selection included; vision tower and pre-LLM selection excluded), ``total_ms`` the whole
``generate``. For robust timings use ``vtprune bench``. Which kept tokens carry *merged* features is found
by wrapping the method's ``select`` on the instance for the run (the record only flags whole events).

The prompt is wrapped in the family's chat template when the processor (or tokenizer) has one, else in a
plain default (``USER: <image>\\n{prompt} ASSISTANT:`` for LLaVA, ``<|vision_start|><|image_pad|>
<|vision_end|>{prompt}`` for Qwen2.5-VL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import vtprune
from vtprune.errors import UnsupportedModelError, VtpruneError
from vtprune.measurement.flops import prefill_flops_all
from vtprune.measurement.timing import PrefillTimer

FAMILIES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
#: families whose inputs vtprune builds itself (tokenizer + PIL Qwen2-VL image processor; no torchvision)
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
#: families without a processor object: inputs from the tokenizer + PIL image processor (`build_inputs`)
OWN_INPUTS = (*QWEN_FAMILIES, "llava_onevision", "gemma3", "internvl")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Loaded:
    """A model ready for `run_one`: the model, its tokenizer and image processor, and how to prompt it."""

    model: torch.nn.Module
    family: str  # "llava" | "llava_next" | "qwen2_5_vl" | "qwen3_vl"
    tokenizer: object
    image_processor: object
    processor: object | None = None  # LLaVA / NeXT processors (they expand the image placeholders)
    chat_template: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        return " ".join(self.notes)


# --- loading ------------------------------------------------------------------------------------------
def family_of(model_or_config) -> str:
    """ "llava" | "llava_next" | "qwen2_5_vl" | "qwen3_vl" from a model or config; UnsupportedModelError otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModelError(
            f"vtprune run/show know LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, Gemma 3 and "
            f"InternVL, not {kind!r}"
        )
    return kind


def load(
    model_id: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int | None = None,
    attn: str = "sdpa",
) -> Loaded:
    """`builtin:NAME`, a local directory or `arch:NAME` -> `Loaded` (model in eval mode, offline).

    layers: `arch:` only, keep the first N decoder layers.
    """
    from vtprune.measurement.arch import build_arch, full_dims, parse_arch_id
    from vtprune.testbed.builtin import BUILTIN_PREFIX, builtin_path

    s = str(model_id)
    arch = parse_arch_id(s)
    if arch is not None:
        model = build_arch(arch, layers, dtype=dtype, device=device, attn=attn)
        loaded = _placeholder_loaded(model)
        loaded.source = s
        full = full_dims(arch).num_layers
        if model.config.text_config.num_hidden_layers != full:
            built = model.config.text_config.num_hidden_layers
            loaded.notes.append(f"Built with {built} of {full} decoder layers: FLOPs and times are for those.")
        return loaded
    path = builtin_path(s[len(BUILTIN_PREFIX) :]) if s.startswith(BUILTIN_PREFIX) else Path(s)
    if not (path / "config.json").exists():
        raise VtpruneError(f"model not found: {s} (expected builtin:NAME, arch:NAME or a directory with a config.json)")
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    cls = getattr(transformers, FAMILIES[family])
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    loaded = _local_processor(model, family, path)
    loaded.source = s
    return loaded


def wrap(model, processor, source: str = "") -> Loaded:
    """An already loaded LLaVA / LLaVA-NeXT model and its processor -> `Loaded` (Qwen: tokenizer + image processor
    are read from the processor's `tokenizer` and `image_processor`)."""
    family = family_of(model)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    proc = processor if family not in OWN_INPUTS else None
    return Loaded(model, family, processor.tokenizer, processor.image_processor, proc, template, source)


def _local_processor(model, family: str, path: Path) -> Loaded:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    errors = []
    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        tok = getattr(proc, "tokenizer", None)
        image_proc = getattr(proc, "image_processor", None)
        if tok is not None and image_proc is not None:
            template = getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None)
            return Loaded(model, family, tok, image_proc, proc if family not in OWN_INPUTS else None, template)
    except Exception as err:  # e.g. Qwen2.5-VL's processor needs torchvision
        errors.append(f"AutoProcessor: {err}".strip().splitlines()[0])
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        errors.append(f"tokenizer/image processor: {err}".strip().splitlines()[0])
        if family == "llava" and _is_testbed_vocab(model):
            from vtprune.testbed import build_processor

            proc = build_processor()
            return Loaded(
                model,
                family,
                proc.tokenizer,
                proc.image_processor,
                proc,
                None,
                notes=["(no processor saved: using the testbed processor)"],
            )
        raise VtpruneError(f"cannot load a processor for {path}: {'; '.join(errors)}") from err
    proc = None
    if family not in OWN_INPUTS:
        proc = _llava_processor(model, family, tok, image_proc)
    return Loaded(model, family, tok, image_proc, proc, getattr(tok, "chat_template", None))


def _is_testbed_vocab(model) -> bool:
    from vtprune.testbed.tokenizer import vocabulary

    vocab = vocabulary()
    return int(model.config.image_token_id) == vocab["<image>"] and model.config.text_config.vocab_size >= len(vocab)


def _llava_processor(model, family: str, tokenizer, image_processor):
    from transformers import LlavaNextProcessor, LlavaProcessor

    cfg = model.config
    image_token = tokenizer.convert_ids_to_tokens(int(cfg.image_token_id))
    cls = LlavaProcessor if family == "llava" else LlavaNextProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(cfg.vision_config.patch_size),
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=image_token,
    )


def placeholder_tokenizer(config):
    """Word-level tokenizer over the model's vocabulary: the special ids the model needs are named tokens
    (`<image>`, `<|vision_start|>`, ...), every other id is `w{id}`; any real word is `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = config.text_config
    vocab_size = int(text.vocab_size)
    named = {}
    for key, name in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
        value = getattr(text, key, None) if getattr(text, key, None) is not None else getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and int(value) not in named:
            named[int(value)] = name
    specials = {"image_token_id": "<image>"}
    if family_of(config) in QWEN_FAMILIES:
        specials = {
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        }
    for key, name in specials.items():
        value = getattr(config, key, None)
        if value is not None:
            named[int(value)] = name
    unk = next(i for i in range(3, vocab_size) if i not in named)
    named[unk] = "<unk>"
    vocab = {named.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {k: v for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>")) if v in vocab}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", padding_side="left", **kw)
    fast.add_special_tokens(
        {"additional_special_tokens": [n for k, n in specials.items() if getattr(config, k, None) is not None]}
    )
    return fast


def _own_image_processor(model, family: str):
    """A PIL image processor with the tile size of an `arch:` LLaVA-OneVision / Gemma 3 / InternVL model."""
    import transformers

    vc = model.config.vision_config
    size = vc.image_size if isinstance(vc.image_size, int) else int(vc.image_size[0])
    if family == "llava_onevision":
        return transformers.LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=model.config.image_grid_pinpoints
        )
    if family == "gemma3":
        return transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size})
    return transformers.GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True)


def _placeholder_loaded(model) -> Loaded:
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    from vtprune.models.qwen_inputs import qwen_image_processor

    family = family_of(model)
    tok = placeholder_tokenizer(model.config)
    if family in QWEN_FAMILIES:
        vc = model.config.vision_config
        image_proc = qwen_image_processor(patch_size=int(vc.patch_size), merge_size=int(vc.spatial_merge_size))
    elif family in OWN_INPUTS:
        image_proc = _own_image_processor(model, family)
    else:
        side = int(model.config.vision_config.image_size)
        common = dict(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        if family == "llava":
            image_proc = CLIPImageProcessorPil(do_center_crop=True, **common)
        else:
            image_proc = LlavaNextImageProcessorPil(image_grid_pinpoints=model.config.image_grid_pinpoints, **common)
    proc = None if family in OWN_INPUTS else _llava_processor(model, family, tok, image_proc)
    note = (
        "random weights with a placeholder tokenizer (every prompt word is <unk>): the answer is noise; "
        "token counts, FLOPs and timings are real."
    )
    return Loaded(model, family, tok, image_proc, proc, None, notes=[note])


# --- inputs -------------------------------------------------------------------------------------------
def prompt_text(loaded: Loaded, prompt: str) -> str:
    """The prompt wrapped in the chat template (one image first, then the text), or the family default."""
    image_token = loaded.tokenizer.convert_ids_to_tokens(int(loaded.model.config.image_token_id))
    if loaded.chat_template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        owner = loaded.processor if loaded.processor is not None else loaded.tokenizer
        try:
            text = owner.apply_chat_template(
                messages, chat_template=loaded.chat_template, add_generation_prompt=True, tokenize=False
            )
            if isinstance(text, str) and text.count(image_token) == 1:
                return text
        except Exception:  # a text-only template: fall back to the default below
            pass
    if loaded.family in QWEN_FAMILIES:
        cfg = loaded.model.config
        start = loaded.tokenizer.convert_ids_to_tokens(int(cfg.vision_start_token_id))
        end = loaded.tokenizer.convert_ids_to_tokens(int(cfg.vision_end_token_id))
        return f"{start}{image_token}{end} {prompt}"
    return f"USER: {image_token}\n{prompt} ASSISTANT:"


def build_inputs(loaded: Loaded, image: Image.Image, prompt: str) -> dict:
    """One image + prompt -> model inputs on the model's device (pixels in the model's dtype)."""
    image = image.convert("RGB")
    text = prompt_text(loaded, prompt)
    if loaded.family in QWEN_FAMILIES:
        from vtprune.models.qwen_inputs import qwen_processor_inputs

        inputs = qwen_processor_inputs(loaded.model.config, loaded.tokenizer, [text], [image], loaded.image_processor)
    elif loaded.family in OWN_INPUTS:
        from vtprune.models.family_inputs import family_inputs

        inputs = family_inputs(loaded.model, loaded.tokenizer, [text], [image], loaded.image_processor)
    else:
        inputs = dict(loaded.processor(images=[image], text=[text], return_tensors="pt"))
    model = loaded.model
    device, dtype = next(model.parameters()).device, model.dtype
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _suppressed(config) -> list[int]:
    """Vision special ids a (random) model must not generate."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(config, n)) for n in names if getattr(config, n, None) is not None]


# --- one run ------------------------------------------------------------------------------------------
def run_one(
    loaded: Loaded,
    image: Image.Image | str | Path,
    prompt: str,
    method: str = "none",
    budget: int | float = 64,
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    options: dict | None = None,
    max_new_tokens: int = 16,
    inputs: dict | None = None,
    keep_patched: bool = False,
) -> dict:
    """Generate an answer with `method` at `budget`.

    -> {answer, method, budget, n_visual, n_text, retained_tokens, layer_avg_tokens, visual_per_layer,
    flops / flops_unpruned ({fastv, swiglu, exact}: analytic LLM prefill FLOPs), prefill_ms (LLM prefill),
    total_ms (whole `generate`), new_tokens, events [{stage, keep_idx (K,), merged, merged_idx}],
    record (the `RunRecord`), note}. `events[i].merged_idx`: the kept indices whose features are merges
    (found by comparing each plan's `new_feats` with the candidates' own features).
    keep_patched: leave the method attached (so `vtprune.last_run(model)` still answers).
    """
    model = loaded.model
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    if inputs is None:
        inputs = build_inputs(loaded, image, prompt)
    options = dict(options or {})
    vtprune.apply(
        model, method, budget, budget_mode=budget_mode, positions=positions, tokenizer=loaded.tokenizer, **options
    )
    merges = _MergeProbe(model)
    try:
        gen_kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "suppress_tokens": _suppressed(model.config)}
        with torch.inference_mode(), PrefillTimer(model.model.language_model) as timer:
            t0 = time.perf_counter()
            out = model.generate(**inputs, **gen_kw)
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            total_ms = (time.perf_counter() - t0) * 1e3
        record = vtprune.last_run(model)
    finally:
        merges.remove()
        if not keep_patched:
            vtprune.remove(model)
    new = out[0, inputs["input_ids"].shape[1] :]
    answer = loaded.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()
    sample = record.samples[0]
    dims = record.dims
    events = []
    merged_so_far: set[int] = set()
    for i, ev in enumerate(sample.events):
        merged_so_far |= merges.by_stage.get(i, set())
        kept = ev.keep_idx.tolist()
        merged_idx = sorted(set(kept) & merged_so_far)
        events.append({"stage": ev.stage, "keep_idx": ev.keep_idx, "merged": bool(ev.merged), "merged_idx": merged_idx})
    return {
        "answer": answer,
        "method": method,
        "budget": budget,
        "budget_mode": budget_mode,
        "options": options,
        "n_visual": sample.n_visual,
        "n_text": sample.n_text,
        "retained_tokens": sample.retained_tokens,
        "layer_avg_tokens": sample.layer_avg_tokens,
        "visual_per_layer": list(sample.visual_per_layer),
        "flops": prefill_flops_all(sample.visual_per_layer, sample.n_text, dims),
        "flops_unpruned": prefill_flops_all([sample.n_visual] * dims.num_layers, sample.n_text, dims),
        "prefill_ms": timer.ms[0] if timer.ms else float("nan"),
        "total_ms": total_ms,
        "new_tokens": int(new.numel()),
        "events": events,
        "record": record,
        "note": loaded.note,
    }


class _MergeProbe:
    """Wraps `session.method.select` on the instance for one run: per stage, the original indices (into the
    image's candidates) of kept tokens whose `new_feats` row differs from the candidate's own features.

    (The run record only says whether an event merged at all; this finds *which* tokens are merges.)
    """

    def __init__(self, model):
        from vtprune.api import session_of

        self.by_stage: dict[int, set[int]] = {}
        self.method = None
        session = session_of(model)
        if session is None or not getattr(session.method, "merges", False):
            return
        self.method = session.method
        original = self.method.select

        def select(stage_index, image, k):
            plan = original(stage_index, image, k)
            if plan.new_feats is not None:
                own = image.features[plan.keep_idx].to(plan.new_feats.dtype)
                differs = (plan.new_feats != own).any(-1).cpu()
                orig = image.original_index[plan.keep_idx.cpu()].cpu()
                self.by_stage.setdefault(stage_index, set()).update(orig[differs].tolist())
            return plan

        self.method.select = select

    def remove(self) -> None:
        if self.method is not None and "select" in self.method.__dict__:
            del self.method.select


# --- CLI glue -----------------------------------------------------------------------------------------
def result_table(result: dict, title: str = ""):
    """Rich table: tokens, FLOPs (pruned / unpruned, three conventions), times."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("", justify="left")
    t.add_column("value", justify="right")
    t.add_row("visual tokens (N)", str(result["n_visual"]))
    t.add_row("text tokens", str(result["n_text"]))
    t.add_row("retained (entering layer 0)", str(result["retained_tokens"]))
    t.add_row("layer-averaged n̄", f"{result['layer_avg_tokens']:.1f}")
    for conv in ("exact", "fastv", "swiglu"):
        p, u = result["flops"][conv], result["flops_unpruned"][conv]
        t.add_row(f"LLM prefill TFLOPs ({conv})", f"{p / 1e12:.4g} / {u / 1e12:.4g} unpruned ({100 * p / u:.1f}%)")
    t.add_row("LLM prefill ms", f"{result['prefill_ms']:.1f}")
    t.add_row(f"total ms (generate, {result['new_tokens']} tokens)", f"{result['total_ms']:.1f}")
    return t
