"""One loader for every application (CLI `run` / `show` / `bench`, lmms-eval, RCP training) and one
input-preparation path.

    loaded = load("builtin:shapes-llava")        # -> Loaded(model, tokenizer, image processor, processor, adapter)
    inputs = build_inputs(loaded, image, "What is shown?")   # prompt in the chat template, on the model's device

Model ids:
- ``builtin:NAME``: a checkpoint shipped in ``vtprune/assets`` (`vtprune.shipped`);
- a local directory saved with ``save_pretrained`` (``local_files_only=True``): the model class from its
  ``model_type`` (the adapter's `model_types`); the processor from ``AutoProcessor``, or, where that cannot be
  built (Qwen2.5-VL's needs torchvision), the directory's tokenizer + image processor; the testbed processor
  as a last resort for LLaVA checkpoints with the testbed vocabulary;
- ``arch:NAME``: a real architecture with *random weights* (`vtprune.loading.arch`), ``tiny:KIND``
  (``llava``, ``llava-next``, ``qwen2.5-vl``): a tiny random test model (`vtprune.testing`); both get a
  placeholder word-level tokenizer (every word of a prompt is ``<unk>``) and the adapter's default PIL image
  processor: answers are noise, token counts, FLOPs and timings are real (``Loaded.note`` says so);
- ``ORG/NAME``: a hub id, through the local cache (``snapshot_download``: downloads unless
  ``HF_HUB_OFFLINE=1``), then as a directory.

Every family fact (model class, processor, default prompt, input layout, default image processor) comes from
the model's adapter (`vtprune.models`); this module holds none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UnsupportedModelError, VtpruneError
from ..shipped import BUILTIN_PREFIX, builtin_path

ARCH_PREFIX = "arch:"
TINY_PREFIX = "tiny:"
#: `tiny:KIND` -> the `vtprune.testing` builder
TINY_MODELS = {
    "llava": "tiny_llava",
    "llava-next": "tiny_llava_next",
    "qwen2.5-vl": "tiny_qwen2_5_vl",
    "qwen": "tiny_qwen2_5_vl",
}
PLACEHOLDER_NOTE = (
    "random weights with a placeholder tokenizer (every prompt word is <unk>): the answer is noise; "
    "token counts, FLOPs and timings are real."
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Loaded:
    """A loaded model with what builds its inputs: tokenizer, image processor, the HF processor where the family
    uses one (else None), the chat template, and how it was loaded."""

    model: torch.nn.Module
    family: str  # the adapter's family name (HF model_type), e.g. "llava_next"
    tokenizer: object
    image_processor: object
    processor: object | None = None  # LLaVA / NeXT processors (they expand the image placeholders)
    chat_template: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    #: the `arch:` name when built from a bundled config (full depth: `vtprune.loading.arch.full_dims`)
    arch: str | None = None
    #: True for `arch:` / `tiny:` models: random weights and a placeholder tokenizer
    synthetic: bool = False

    @property
    def note(self) -> str:
        return " ".join(self.notes)

    @property
    def adapter(self):
        """The model's `ModelAdapter` (a fresh one: adapters hold per-call state)."""
        from ..models import adapter_for

        return adapter_for(self.model)

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (what `PrefillTimer` times)."""
        return self.adapter.language_model


# --- loading ------------------------------------------------------------------------------------------
def family_of(model_or_config) -> str:
    """The family name ("llava", "qwen2_5_vl", ...) of a model or config; `UnsupportedModelError` otherwise."""
    from ..models import adapter_class

    config = getattr(model_or_config, "config", model_or_config)
    adapter_class(config)  # raises for an unsupported model type
    return str(config.model_type)


def load(
    model_id: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int | None = None,
    attn: str = "sdpa",
    seed: int = 0,
    revision: str | None = None,
) -> Loaded:
    """`builtin:NAME`, `arch:NAME`, `tiny:KIND`, a local directory or a hub id -> `Loaded` (model in eval mode).

    layers: `arch:` / `tiny:` only, keep the first N decoder layers (tiny default 4). seed: their random weights.
    revision: hub ids only.
    """
    s = str(model_id)
    if s.startswith(ARCH_PREFIX):
        return _load_arch(s, device, dtype, layers, attn, seed)
    if s.startswith(TINY_PREFIX):
        return _load_tiny(s, device, dtype, layers, attn, seed)
    if s.startswith(BUILTIN_PREFIX):
        try:
            path = builtin_path(s[len(BUILTIN_PREFIX) :])
        except FileNotFoundError as err:
            raise VtpruneError(f"model not found: {s} ({err})") from None
    else:
        path = Path(s).expanduser()
        if not path.exists() and _HUB_ID.match(s):
            path = _hub_snapshot(s, revision)
    if not (path / "config.json").exists():
        raise VtpruneError(
            f"model not found: {s} (expected builtin:NAME, arch:NAME, tiny:KIND, a directory with a config.json "
            "or a hub id ORG/NAME)"
        )
    return _load_directory(path, s, device, dtype, attn)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub id -> its local snapshot directory (downloaded unless `HF_HUB_OFFLINE=1`, then from the cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as err:  # offline without a cached copy, unknown repo, no network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VtpruneError(f"model not found: {repo_id} (no such directory; as a hub id: {first})") from None


def _load_directory(path: Path, source: str, device: str, dtype: torch.dtype, attn: str) -> Loaded:
    import transformers
    from transformers import AutoConfig

    from ..models import adapter_class

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = getattr(transformers, adapter_class(config).model_classes[0])
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    loaded = _local_processor(model, path)
    loaded.source = source
    return loaded


def _local_processor(model, path: Path) -> Loaded:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from ..models import adapter_for

    adapter = adapter_for(model)
    family = adapter.family
    errors = []
    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        tok = getattr(proc, "tokenizer", None)
        image_proc = getattr(proc, "image_processor", None)
        if tok is not None and image_proc is not None:
            template = getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None)
            return Loaded(model, family, tok, image_proc, proc if adapter.uses_processor else None, template)
    except Exception as err:  # e.g. Qwen2.5-VL's processor needs torchvision
        errors.append(f"AutoProcessor: {err}".strip().splitlines()[0])
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        errors.append(f"tokenizer/image processor: {err}".strip().splitlines()[0])
        if _is_testbed_model(model):
            from ..testbed import build_processor

            proc = build_processor()
            note = "(no processor saved: using the testbed processor)"
            return Loaded(model, family, proc.tokenizer, proc.image_processor, proc, None, notes=[note])
        raise VtpruneError(f"cannot load a processor for {path}: {'; '.join(errors)}") from err
    proc = adapter.make_processor(tok, image_proc)
    return Loaded(model, family, tok, image_proc, proc, getattr(tok, "chat_template", None))


def _is_testbed_model(model) -> bool:
    """A LLaVA-1.5 checkpoint with the testbed's vocabulary (the testbed's processor fits it)."""
    if type(model).__name__ != "LlavaForConditionalGeneration":
        return False
    from ..testbed.tokenizer import vocabulary

    vocab = vocabulary()
    return int(model.config.image_token_id) == vocab["<image>"] and model.config.text_config.vocab_size >= len(vocab)


def _load_arch(s: str, device: str, dtype: torch.dtype, layers: int | None, attn: str, seed: int) -> Loaded:
    from .arch import build_arch, full_dims, parse_arch_id

    try:
        name = parse_arch_id(s)
    except KeyError as err:
        raise VtpruneError(str(err.args[0])) from None
    model = build_arch(name, layers, dtype=dtype, device=device, attn=attn, seed=seed)
    loaded = wrap_synthetic(model, s)
    loaded.arch = name
    full = full_dims(name).num_layers
    built = model.config.text_config.num_hidden_layers
    if built != full:
        loaded.notes.append(f"Built with {built} of {full} decoder layers: FLOPs and times are for those.")
    return loaded


def _load_tiny(s: str, device: str, dtype: torch.dtype, layers: int | None, attn: str, seed: int) -> Loaded:
    from .. import testing

    kind = s[len(TINY_PREFIX) :]
    if kind not in TINY_MODELS:
        raise VtpruneError(f"unknown tiny model {kind!r}; choose one of {tuple(TINY_MODELS)}")
    model = getattr(testing, TINY_MODELS[kind])(attn=attn, layers=layers or 4, seed=seed)
    return wrap_synthetic(model.to(device=device, dtype=dtype), s)


def wrap(model, processor, source: str = "") -> Loaded:
    """An already loaded model and its processor -> `Loaded` (the tokenizer and image processor are read from the
    processor's `tokenizer` and `image_processor`; the processor is kept where the family builds inputs with it)."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    proc = processor if adapter.uses_processor else None
    return Loaded(model, adapter.family, processor.tokenizer, processor.image_processor, proc, template, source)


def wrap_synthetic(model, source: str = "") -> Loaded:
    """A model without tokenizer or processor (random weights) -> `Loaded` with the placeholder tokenizer and the
    adapter's default image processor."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    tok = placeholder_tokenizer(model.config)
    image_proc = adapter.default_image_processor()
    proc = adapter.make_processor(tok, image_proc)
    return Loaded(model, adapter.family, tok, image_proc, proc, None, source, [PLACEHOLDER_NOTE], synthetic=True)


def placeholder_tokenizer(config):
    """Word-level tokenizer over the model's vocabulary: the special ids the model needs are named tokens
    (the adapter's `placeholder_tokens`, e.g. `<image>`, `<|vision_start|>`), every other id is `w{id}`; any
    real word is `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..models import adapter_class

    text = config.text_config
    vocab_size = int(text.vocab_size)
    named = {}
    for key, name in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
        value = getattr(text, key, None) if getattr(text, key, None) is not None else getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and int(value) not in named:
            named[int(value)] = name
    specials = adapter_class(config).placeholder_tokens
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


# --- inputs -------------------------------------------------------------------------------------------
def prompt_text(loaded: Loaded, text: str, n_images: int = 1, chat_template: str | None = None) -> str:
    """The one prompt builder: `n_images` images first, then `text`, in the chat template (`chat_template`, else
    the processor's or tokenizer's) when it places exactly one placeholder per image, else the adapter's
    `default_prompt`."""
    adapter = loaded.adapter
    image_token = adapter.image_token_text(loaded.tokenizer)
    template = chat_template or loaded.chat_template
    if template:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        owner = loaded.processor if loaded.processor is not None else loaded.tokenizer
        try:
            out = owner.apply_chat_template(
                [{"role": "user", "content": content}], chat_template=template, add_generation_prompt=True,
                tokenize=False,
            )  # fmt: skip
            if isinstance(out, str) and out.count(image_token) == n_images:
                return out
        except Exception:  # a text-only template: the default below
            pass
    return adapter.default_prompt(loaded.tokenizer, text, n_images)


def to_model(inputs: dict, model: torch.nn.Module) -> dict:
    """Every tensor of `inputs` on the model's device, floating ones in the model's dtype (pixels)."""
    device, dtype = next(model.parameters()).device, model.dtype
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def prepare_inputs(loaded: Loaded, prompts: list[str], images: list) -> dict:
    """Prompts (from `prompt_text`) + PIL images (in order, sample after sample) -> left-padded model inputs on
    the model's device (the adapter's `prepare_inputs`, then `to_model`)."""
    flat = [im.convert("RGB") for im in images]
    inputs = loaded.adapter.prepare_inputs(prompts, flat, loaded.tokenizer, loaded.image_processor, loaded.processor)
    return to_model(inputs, loaded.model)


def build_inputs(loaded: Loaded, image, prompt: str) -> dict:
    """One image + prompt -> model inputs on the model's device (pixels in the model's dtype)."""
    return prepare_inputs(loaded, [prompt_text(loaded, prompt)], [image])


def suppressed_ids(config) -> list[int]:
    """Vision special ids a (random) model must not generate."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(config, n)) for n in names if getattr(config, n, None) is not None]


__all__ = [
    "Loaded",
    "UnsupportedModelError",
    "build_inputs",
    "family_of",
    "load",
    "placeholder_tokenizer",
    "prepare_inputs",
    "prompt_text",
    "suppressed_ids",
    "to_model",
    "wrap",
    "wrap_synthetic",
]
