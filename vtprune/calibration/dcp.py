"""τ_κ calibration for DCP-Prune (spec dcp_prune.md, "Hyperparameters"): the 90th percentile of κ_A, the
consistency of ACGR's output at the reference budget ρ_ref = 1/9 (K = round(ρ·N) per image), over a set of
images with a fixed prompt (spec: 256 COCO val2017 images with the lowest ids, "Describe this image briefly.").

    from vtprune.calibration.dcp import calibrate_folder, model_key, write_tau
    tau = calibrate_folder(model, processor, "coco/val2017", n_images=256)
    write_tau(model_key(model), tau, n_images=256)      # or keep it and pass tau_kappa=tau to vtprune.apply

κ_A is measured through the real engine: `vtprune.apply(model, DCPPrune(tau_kappa=inf, ...), ρ,
budget_mode="retained")`, one forward per batch, reading the method's per-crop decisions (LLaVA-NeXT: one κ_A per
crop, all crops pooled; crops kept whole are skipped). κ_A does not depend on the prompt text, but it does depend on
the recovery rule (`recovery`, `context_cap`): calibrate with the options the method will run with.

Built-in benchmark v3 (`calibrate_builtin`, the shipped `builtin:shapes-v3-llava` entry): scenes 0..255 of the
**calibration split** (`vtprune.testbed.splits`; the held-out test split is refused with `SplitError`), prompt
"what number is in the box ?" (the testbed vocabulary has no words for "Describe this image briefly.").
`calibrate_builtin_v2` reproduces the older `builtin:shapes-llava` entry (v2 eval stream, no splits).

This module is an application: it runs models and reads the testbed. The method only reads the table
(`vtprune.methods._dcp_tau`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..methods._dcp_tau import user_tau_path, write_tau_table
from ..methods.dcp_prune import TAU_TABLE, DCPPrune, DCPPruneConfig, calibration_key_of, shipped_tau_kappa
from ..testbed.splits import Split, calibration_routine, calibration_split, require_calibration

#: The spec's calibration prompt (wrapped in the processor's chat template when it has one).
DEFAULT_PROMPT = "Describe this image briefly."
#: Prompt used for the built-in benchmark (its word-level vocabulary cannot spell DEFAULT_PROMPT).
BUILTIN_PROMPT = "what number is in the box ?"
#: The built-in benchmark v3 model and its table key.
BUILTIN_V3 = "shapes-v3-llava"
BUILTIN_V3_KEY = "builtin:" + BUILTIN_V3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def model_key(model) -> str:
    """Calibration-table key of a model: "builtin:NAME" for a shipped checkpoint, else its `name_or_path`."""
    return calibration_key_of(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))


def chat_prompt(processor, text: str = DEFAULT_PROMPT) -> str:
    """One user turn with one image and `text`, plus the generation header: the processor's chat template if
    it has one, else the LLaVA-1.5 format `USER: <image>\\n{text} ASSISTANT:`."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        try:
            return processor.apply_chat_template(conv, add_generation_prompt=True)
        except Exception:  # any template failure falls back to the plain LLaVA prompt
            pass
    token = getattr(processor, "image_token", "<image>")
    return f"USER: {token}\n{text} ASSISTANT:"


def image_batches(
    processor, images: Iterable, prompt: str, batch_size: int = 8, device=None, dtype: torch.dtype | None = None
) -> Iterator[dict]:
    """Processor outputs for `images` (PIL images or paths), `batch_size` at a time, one `prompt` each."""
    from PIL import Image

    def load(x):
        return x if isinstance(x, Image.Image) else Image.open(x).convert("RGB")

    chunk: list = []
    for im in images:
        chunk.append(load(im))
        if len(chunk) == batch_size:
            yield _encode(processor, chunk, prompt, device, dtype)
            chunk = []
    if chunk:
        yield _encode(processor, chunk, prompt, device, dtype)


def _encode(processor, images, prompt, device, dtype) -> dict:
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device) if device is not None else v
            if dtype is not None and k == "pixel_values":
                v = v.to(dtype)
        out[k] = v
    return out


def kappa_values(model, batches: Iterable[dict], budget_ratio: float = 1 / 9, **options) -> list[float]:
    """κ_A of ACGR at K = round(budget_ratio·N) for every crop of every image in `batches` (model inputs).

    options: DCP-Prune options (e.g. `recovery`, `context_cap`), except `tau_kappa` (forced to +inf).
    """
    import vtprune

    options = {k: v for k, v in options.items() if k != "tau_kappa"}
    method = DCPPrune(DCPPruneConfig(tau_kappa=math.inf, **options))
    values: list[float] = []
    vtprune.apply(model, method, budget_ratio, budget_mode="retained")
    try:
        for inputs in batches:
            method.decisions.clear()
            with torch.no_grad():
                model(**inputs)
            values += [d.kappa_a for image in method.decisions for d in image if d.branch != "all"]
    finally:
        vtprune.remove(model)
    return values


def percentile_of(values: list[float], percentile: float = 90.0) -> float:
    """The `percentile`-th percentile (linear interpolation) of κ_A values; ValueError when there are none."""
    if not values:
        raise ValueError("no κ_A values: no image was pruned at this budget ratio")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), percentile / 100.0))


def calibrate_tau_kappa(
    model,
    processor_or_inputs,
    budget_ratio: float = 1 / 9,
    percentile: float = 90.0,
    *,
    images: Iterable | None = None,
    prompt: str | None = None,
    batch_size: int = 8,
    **options,
) -> float:
    """τ_κ = the `percentile`-th percentile (linear interpolation) of κ_A over the calibration images.

    processor_or_inputs: an iterable of ready model-input dicts, or (with `images`) the model's processor;
    images: PIL images or paths; prompt: full prompt text (default: `chat_prompt(processor)`).
    """
    if images is not None:
        processor = processor_or_inputs
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        batches = image_batches(processor, images, prompt or chat_prompt(processor), batch_size, device, dtype)
    else:
        batches = processor_or_inputs
    return percentile_of(kappa_values(model, batches, budget_ratio, **options), percentile)


def folder_images(folder: str | Path, n_images: int = 256) -> list[Path]:
    """The first `n_images` image files of a folder in file-name order (COCO val2017: the lowest image ids)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:n_images]


def calibrate_folder(
    model,
    processor,
    folder: str | Path,
    n_images: int = 256,
    budget_ratio: float = 1 / 9,
    percentile: float = 90.0,
    prompt: str | None = None,
    batch_size: int = 8,
    **options,
) -> float:
    """`calibrate_tau_kappa` over the first `n_images` images of a folder (spec: COCO val2017, 256 images)."""
    return calibrate_tau_kappa(
        model,
        processor,
        budget_ratio,
        percentile,
        images=folder_images(folder, n_images),
        prompt=prompt,
        batch_size=batch_size,
        **options,
    )


def split_images(split: Split, n_images: int) -> Iterator:
    """PIL renderings of scenes 0..n_images−1 of a v3 split (a calibration routine's images)."""
    from ..testbed.scenes_v3 import render

    require_calibration(split, "split_images")
    return (render(split.scene(i)) for i in range(n_images))


@calibration_routine
def calibrate_builtin(
    split: Split | None = None,
    name: str = BUILTIN_V3,
    n_images: int = 256,
    budget_ratio: float = 1 / 9,
    percentile: float = 90.0,
    batch_size: int = 16,
    model=None,
    processor=None,
    **options,
) -> float:
    """τ_κ of a built-in v3 model on scenes 0..n_images−1 of `split` (default: the calibration split; the test
    split raises `SplitError`). name: `builtin:NAME`'s NAME or a model directory; or pass `model`/`processor`.
    options: DCP-Prune options the method will run with (`recovery`, `context_cap`, ...)."""
    from ..eval.shapes import load_model
    from ..testbed.tokenizer import prompt

    split = require_calibration(split if split is not None else calibration_split(), "calibrate_builtin")
    if model is None:
        model, processor = load_model(name if Path(name).is_dir() else "builtin:" + name)
    return calibrate_tau_kappa(
        model,
        processor,
        budget_ratio,
        percentile,
        images=split_images(split, n_images),
        prompt=prompt(BUILTIN_PROMPT),
        batch_size=batch_size,
        **options,
    )


def calibrate_builtin_v2(
    name: str = "shapes-llava",
    n_images: int = 256,
    budget_ratio: float = 1 / 9,
    percentile: float = 90.0,
    batch_size: int = 16,
) -> float:
    """The older v2 entry (`builtin:shapes-llava`): scenes 0..n_images−1 of the v2 eval stream (`EVAL_SEED`,
    disjoint from the v2 held-out set; v2 has no splits)."""
    from ..testbed import load_builtin, make_scene, prompt, render
    from ..testbed.data import EVAL_SEED

    model, processor = load_builtin(name)
    images = (render(make_scene(EVAL_SEED, i)) for i in range(n_images))
    return calibrate_tau_kappa(
        model, processor, budget_ratio, percentile, images=images, prompt=prompt(BUILTIN_PROMPT), batch_size=batch_size
    )


def write_tau(key: str, tau: float, path: str | Path | None = None, *, package_asset: bool = False, **meta) -> Path:
    """Store τ_κ for `key` (plus metadata such as n_images) in a calibration table (atomic replace); -> its path.
    path None: the per-user table (`_dcp_tau.user_tau_path()`, read by the τ lookup); a path inside the installed
    package is refused unless `package_asset` (the maintainers' re-calibration of the shipped table)."""
    p = Path(path) if path is not None else user_tau_path()
    return write_tau_table(p, key, tau, allow_package=package_asset, **meta)


def write_shipped_tau(key: str, tau: float, **meta) -> Path:
    """Maintainers only: store τ_κ for `key` in the table shipped with vtprune (`vtprune/assets/dcp_tau.json`)."""
    return write_tau(key, tau, TAU_TABLE, package_asset=True, **meta)


def read_tau(key: str, path: str | Path | None = None) -> float | None:
    """Calibrated τ_κ for `key`, or None."""
    return shipped_tau_kappa(key, path)


if __name__ == "__main__":  # python -m vtprune.calibration.dcp  (re-computes the shipped v2 value)
    torch.set_num_threads(1)
    value = calibrate_builtin_v2()
    print(value)
    print(
        write_shipped_tau(
            "builtin:shapes-llava",
            value,
            n_images=256,
            budget_ratio=round(1 / 9, 6),
            percentile=90,
            images="testbed eval stream (EVAL_SEED) scenes 0..255",
            prompt=BUILTIN_PROMPT,
        )
    )
