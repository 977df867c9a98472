"""Three-stage curriculum that trains the built-in model on CPU in about an hour.

Stage A trains the CLIP tower alone with dense per-patch targets (colour, shape, digit, and the
patch's normalised x/y) through a linear head on the penultimate layer, the feature LLaVA feeds to
the projector. The head is training-only and is not saved with the model. Stage B freezes the tower
(its forward runs under no_grad) and trains projector + Llama decoder on several questions packed
into one conversation per image, padded to a fixed length. Both stages use bf16 autocast when `bf16` is set
(the CLI's `--precision auto` sets it where the CPU has native bf16, `fast_bf16`).
Checkpoints (`DIR/state/step-*`: safetensors + JSON, published atomically with a checked manifest, see
`vtprune.checkpointing`) are written every `save_every` steps and a run resumes from them.
Stage C (`cls_steps`, cls_saliency.py) then trains only the exported model's [CLS] embedding so that its
feature-layer attention ranks the object and digit patches first, as a trained CLIP [CLS] would.

Stage B starts from a data-dependent projector init (`projector_init`): "standardize" folds the
per-channel mean/std of the frozen features into the first projector layer; "probe" (default) also
fits linear per-patch read-outs (colour, shape, digit classes and the cell's x/y: the Stage-A targets)
on frozen features of Stage-A scenes and writes them into the first 25 output rows of that layer, so
that the decoder starts from tokens whose first channels already say what the patch holds. Measured
(issue #7): with "standardize" alone the decoder plateaus at ~0.6 on conditional look-ups ("what
colour is the triangle?") for thousands of steps although a linear probe reads shape at 0.99, while
with symbolic (one-hot) visual tokens, or with the probe init, the same decoder learns the look-up to
~1.0 within 250-600 steps. The init only uses the training scenes' patch labels; nothing of it depends
on the question or the answer, and the shipped model is a plain projector (no extra parameters).
`type_schedule` asks only some question types early in Stage B (e.g. colour, then colour + shape, then
all): trained on all six types from the start, the decoder stayed at the ~0.5 plateau even with the
probe init (docs/testbed.md has the measurements).

Left/right needs each object's column in its visual token: Stage A weighs object and digit patches
`xy_object_weight` times a background patch in the xy regression, and `token_xy_weight` > 0 adds a
training-only (x, y) read-out on the projected informative tokens in Stage B (`TokenXYHead`).
`column_code_scale` > 0 makes the probe init also write a 23-row column thermometer (docs/testbed.md:
the one-object "is the X left ?" question left chance on real features only with it, at scale 6).
`row_code_scale` > 0 writes a row thermometer into the projector rows after it (v3's "above" questions:
the activation loses the one-number y read-out). `fetch_weight` > 0 (shapes-v3) adds a training-only read-out
of the asked objects' centres at each answer position (`answer_readout.py`), a direct gradient for the fetch
that relations and "the object left of X" need. `tower_lr_b` > 0 (shapes-v3) lets Stage B train the tower too,
end to end on the answers, with Stage A's dense loss on the same scenes (`tower_dense_weight`) so that the
channels the projector reads stay readable; Stage A's heads are fitted on the frozen tower first when the run
has no Stage A of its own (`init`).

`init` starts from every weight of an existing checkpoint (a fine-tune; with `column_code_scale` or
`row_code_scale` > 0 only those code rows are rewritten), and `training_types` adds unscored question types
to Stage B: the default "side" ("is the X left ?") is what made the shapes-v2 spatial question learnable in
the shipped fine-tune (docs/testbed.md).

`vision_init` loads the vision tower of an existing checkpoint (e.g. "builtin:shapes-llava") instead
of training it, and `feature_cache` precomputes the frozen features of N Stage-B scenes once and cycles
over them with fresh questions each pass (the tower is frozen in Stage B, so this is the same
computation minus the repeated rendering and vision forward).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpointing as cpt
from . import parallel
from .answer_readout import AnswerReadout, answer_positions
from .count_attention import count_attention_loss
from .count_readout import CountReadout, tower_count_loss
from .data import EVAL_SEED, Packing, dense_batch
from .datasets import get_dataset
from .evaluate import evaluate, majority_baseline
from .features import vision_features
from .fetch_attention import fetch_attention_loss, relay_attention_loss
from .model import ModelSize
from .questions import QUESTION_TYPES, TRAINING_TYPES
from .scenes import COLOURS, SHAPES
from .scenes_v3 import COUNT_MARKS
from .tokenizer import vocabulary
from .weight_ema import WeightEMA

IMAGE_TOKEN_ID = vocabulary()["<image>"]
NUM_PATCHES = 576


@dataclass
class TrainConfig:
    """Everything that defines a run (written into the model card)."""

    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    steps_a: int = 600
    batch_a: int = 16
    lr_a: float = 2e-3
    steps_b: int = 6000
    batch_b: int = 8
    lr_b: float = 1.5e-3
    questions_per_image: int = 10
    # Stage B steps < single_steps: one question per sequence, `single_batch` images per step (the look-up is
    # learned on short single-question sequences before packing; packed from the start, v3 stayed at the prior)
    single_steps: int = 0
    single_batch: int = 64
    warmup: int = 50
    weight_decay: float = 0.01
    eval_every: int = 250
    eval_per_type: int = 30
    eval_seed: int = EVAL_SEED
    save_every: int = 50
    # Stage B curriculum "600:8,1000:32": steps < 600 see 8 visual tokens (all informative ones first),
    # steps < 1000 see 32, later steps all 576. Empty: always 576.
    keep_schedule: str = "5400:8,5800:32"
    target_min_type: float = 0.97  # Stage B stops early once every type reaches this on the eval set
    time_limit_b: float = 0.0  # seconds; 0 = no limit
    # with time_limit_b: Stage B's cosine follows whichever of its step count and its time limit is further along,
    # so a Stage B its time limit ends still anneals (the chain's phases ended at up to their peak learning rate
    # without it: testbed docs, thirteenth session)
    anneal_by_time: bool = False
    threads: int = 1
    procs: int = 1  # data-parallel processes of `threads` threads each (parallel.py; the CLI's --procs)
    bf16: bool = True
    vision_init: str = ""  # "builtin:NAME" or a checkpoint dir whose vision tower is loaded before Stage A
    init: str = ""  # "builtin:NAME" or a checkpoint dir: start from its whole model (tower, projector, LLM)
    projector_init: str = "probe"  # "standardize" | "probe" (see the module docstring)
    probe_scenes: int = 400  # Stage-A-seed scenes the probe init is fitted on
    column_code_scale: float = 0.0  # probe init: scale of the column-thermometer rows (0 = none)
    row_code_scale: float = 0.0  # probe init: scale of the row-thermometer rows after them (0 = none)
    xy_object_weight: float = 20.0  # Stage A: weight of object/digit patches in the xy regression
    token_xy_weight: float = 0.0  # Stage B: weight of the training-only TokenXYHead loss (0 = off)
    # Stage B: weight of the training-only answer-position read-out of the asked objects' centres
    # (answer_readout.py; 0 = off; needs batches with "fetch" targets, i.e. shapes-v3) and the decoder layer
    # after which the named object's centre is read (0: half the decoder's depth)
    fetch_weight: float = 0.0
    fetch_layer: int = 0
    # with fetch_weight > 0: the read-out after `fetch_layer` also gives the second object where the question names
    # it (a relation's other object), so that the decoder fetches both named objects by then
    fetch_second: bool = False
    # Stage B: weight of the training-only count read-outs (count_readout.py; 0 = off; needs batches with "share" /
    # "count" targets, i.e. shapes-v3): per-patch object shares after decoder layer `count_layer` (0: the first)
    # and the asked count at the answer position
    count_weight: float = 0.0
    count_layer: int = 0
    # Stage B: weight of the training-only attention target for counting (count_attention.py; 0 = off; shapes-v3):
    # head 0 of decoder layer `count_attention_layer` (1-based; 0: the last but one) attends, at each count
    # question's answer position, uniformly to <s> and to the asked colour's or shape's centre tokens
    count_attention_weight: float = 0.0
    count_attention_layer: int = 0
    count_sink_weight: float = 1.0  # that target's weight on <s> relative to each centre token (count_attention.py)
    # where that target sits: "answer" (above) or "name": at the counted phrase's last word ("objects" of "how many
    # green objects are there ?"), where the fetch targets' "name" variant fetches a named object; its relay then
    # also carries that word to the answer position (needs fetch_attention_at "name", the count layer before the
    # relay's)
    count_attention_at: str = "answer"
    # what the count target counts one unit for: "centre" (the patch holding each counted object's centre) or
    # "object" (each counted object's summed attention over all its patches, `scenes_v3.object_groups`: no patch
    # border decides whether an object counts; seventeenth session: no better than "centre")
    count_attention_unit: str = "centre"
    # more heads that learn the same count target, "LAYER:HEAD,..." (1-based layers, 0-based heads; "" = none):
    # each adds its loss at `count_attention_weight`; nineteenth session: if the heads' errors were independent they
    # would average out, but two more heads (u16: heads 0 and 1 of layer 4) left counting unchanged (0.66 both)
    count_attention_heads: str = ""
    # Stage B: weight of the training-only attention targets for fetching (fetch_attention.py; 0 = off; shapes-v3): in
    # decoder layer `fetch_attention_layer` (1-based; 0: half the depth), at each answer position, head 0 attends to
    # the named object's image tokens and the last head to a relation's second object's (a number's tens / units
    # digit; an exist question's asked object, or <s> where it is absent)
    fetch_attention_weight: float = 0.0
    fetch_attention_layer: int = 0
    # where those targets sit: "answer" (above) or "name": head 0 of that layer at the last word of each named object
    # in the question attends to that object's image tokens, and the last head of the next layer, at the answer
    # position, to those name ends (fetch_attention.py)
    fetch_attention_at: str = "answer"
    fetch_relay_layer: int = 0  # the "name" variant's relay layer (1-based; 0: the one after fetch_attention_layer)
    # > 0 (with fetch_attention_weight > 0): at each leftof question's answer position, the last head of this decoder
    # layer (1-based; after the named object reached the answer position: the relay's, or fetch_attention_layer's)
    # attends to the left neighbour, whose colour is asked (fetch_attention.py)
    fetch_neighbour_layer: int = 0
    feature_cache: int = 0  # > 0: Stage B cycles over the cached frozen features of this many scenes
    # Stage B learning rate of the vision tower (0 = frozen, the default). > 0 trains the tower end to end on the
    # answers, with Stage A's dense per-patch loss on the same scenes at weight `tower_dense_weight` (shapes-v3;
    # the tower's features change, so they cannot be cached: needs feature_cache 0). Without a Stage A in the run
    # (`init`), Stage A's heads are first fitted on the frozen features for `head_fit_steps` steps.
    tower_lr_b: float = 0.0
    tower_dense_weight: float = 1.0
    # with tower_lr_b > 0: weight of a training-only per-patch regression of the object shares
    # (`scenes_v3.object_share`, summed over a colour's or shape's patches: its count) on the tower's features
    tower_share_weight: float = 0.0
    # the decomposition that regression learns: "share" (each object's pixel share per patch, `object_share`) or
    # "centre" (one patch per object, the one holding its centre, `object_centres`, binary cross-entropy)
    tower_count_target: str = "share"
    # the centre targets' spread in pixels (`scenes_v3.object_centres`; the tower's "centre" target and the count
    # attention target): 0 puts each object's unit on the one patch holding its centre, > 0 splits it over the patches
    # a square of that side around the centre overlaps (twentieth session: 7 px moved the marks' error from centres
    # on a patch border to the split band and left counting as it was; 0 in the chain)
    centre_spread: float = 0.0
    # where each object's unit sits in those centre targets, "+"-joined marks of `scenes_v3.COUNT_MARKS`: "centre" (the
    # patch holding its centre, above) or an extreme visible pixel ("top": the first in raster order, "bottom",
    # "left", "right"). With M > 1 marks the tower classifies each (M (C + S) outputs) and the M count heads
    # (head 0 of count_attention_layer, then count_attention_heads) learn one mark each, so a later layer can average
    # M nearly independent counts; centre_spread needs "centre" alone. Twenty-first session: the marks' errors are
    # nearly independent (probes: centre + top + left count 0.88 right against 0.73 for the centre alone), but one
    # hour from a centre-trained model (u23) answered counts worse than the control (0.71 against 0.79) and 35
    # minutes more left it level on one set and behind on another (counting 0.83 / 0.77 against 0.81 / 0.85)
    count_mark: str = "centre"
    # with tower_count_target "centre": weight of a second term on the tower's centre classifier, the squared error of
    # its probabilities summed over the 576 patches (the count they imply) against each channel's count, averaged
    # over scenes and channels (`count_readout.centre_classification`); 0: the per-patch loss alone
    centre_sum_weight: float = 0.0
    # with tower_lr_b > 0: weight of a training-only per-patch classification of each digit with its place in the
    # number (tens or units; `patch_labels`' "place") on the tower's features
    tower_place_weight: float = 0.0
    head_fit_steps: int = 200
    # Stage B question-type curriculum "800:colour+shape": steps < 800 ask only these types; later all.
    # A type listed twice ("100000:count+count+colour+...") is asked about twice as often.
    type_schedule: str = ""
    training_types: str = "side"  # "+"-joined training-only question types asked with the scored ones
    # Stage B hands over its final state (`out/model` written once when Stage B ends, by its step count or its time
    # limit, which then also ends the run) instead of the best model on the watched set (`v3_chain`'s phases: with 30
    # questions per type the watched set picks noise, docs/testbed.md "seventh session")
    export_final: bool = False
    cls_steps: int = 100  # Stage C: Adam steps on the [CLS] embedding's attention (0 = skip; cls_saliency.py)
    cls_lr: float = 0.05
    # Stage C: weight of a penalty on the patch features' drift (cls_saliency.tune_cls_embedding; 0 = none)
    cls_drift_weight: float = 0.0
    # Stage B: decay of an exponential moving average of the model's weights (`weight_ema.py`), updated after every
    # step from Stage B's start and exported beside the final model as `out/model_ema` (0 = off; needs export_final)
    ema_decay: float = 0.0
    # Stage C before Stage B instead of after it, on the model Stage B starts from (needs tower_lr_b == 0: the
    # frozen tower keeps the tuned [CLS] attention, and Stage B's decoder adapts to the patch features Stage C
    # shifted; tuned after Stage B, those shifts cost a trained v3 model 0.05 of its accuracy, testbed docs,
    # thirteenth session)
    cls_before_b: bool = False
    data: str = "shapes-v2"  # benchmark version the run reads (datasets.py): "shapes-v2" or "shapes-v3"

    def to_dict(self) -> dict:
        return asdict(self)


class DenseHeads(nn.Module):
    """Training-only linear read-outs on the penultimate ViT layer: [B, 576, D] -> per-patch logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.digit = nn.Linear(width, 11)
        self.xy = nn.Linear(width, 2)

    def loss(self, feats: torch.Tensor, target: dict[str, torch.Tensor],
             xy_object_weight: float = 20.0) -> tuple[torch.Tensor, dict]:
        """feats [B, 576, D] (no [CLS]); targets [B, 576] ints and xy [B, 576, 2].

        The xy regression weighs object and digit patches `xy_object_weight` times a background patch:
        they are 4-8 of 576 patches, and left/right questions need *their* column (with uniform
        weights the tower learned xy on the background and kept only a ~1.5-cell column on objects).
        """
        feats = feats.float()
        total, stats = feats.new_zeros(()), {}
        for name in ("colour", "shape", "digit"):
            loss, stats[name] = patch_classification(getattr(self, name)(feats), target[name])
            total = total + loss
        fg = ((target["colour"] > 0) | (target["digit"] > 0)).float()  # [B, 576]
        w = 1.0 + (xy_object_weight - 1.0) * fg
        err = (self.xy(feats) - target["xy"]).square().sum(-1)  # [B, 576]
        total = total + 10.0 * (w * err).sum() / (2 * w.sum())
        grid = int(round(math.sqrt(feats.shape[1])))
        stats["xy_obj_cells"] = ((err.sqrt() * fg).sum() / fg.sum().clamp_min(1) * (grid - 1)).item()
        return total, stats


def patch_classification(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(cross-entropy, accuracy on labelled patches) of per-patch logits [B, 576, K] against labels y [B, 576]
    (0 = background): labelled patches weigh 20 times a background patch, which would otherwise dominate. Stage A's
    heads and the tower's digit-place read-out (`patch_labels`' "place": 1..10 a tens digit, 11..20 a units digit)."""
    k = logits.shape[-1]
    weight = torch.full((k,), 20.0, device=logits.device)
    weight[0] = 1.0
    loss = F.cross_entropy(logits.float().reshape(-1, k), y.reshape(-1), weight=weight)
    fg = y > 0
    acc = (logits.argmax(-1)[fg] == y[fg]).float().mean().item() if fg.any() else float("nan")
    return loss, acc


def shorten(batch: dict[str, torch.Tensor], feats: torch.Tensor, keep: int,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Curriculum helper: keep `keep` of the 576 visual tokens per sample (highest `priority` first when the batch
    has it (v3: object centres and digits, then other informative patches), else all informative ones; then random
    background ones; raster order) with their original position ids, like a pre-LLM pruning.

    feats [B, 576, Dv] -> [B, keep, Dv]; ids/labels/mask [B, T] -> [B, T - 576 + keep]; adds position_ids.
    """
    b, n = batch["informative"].shape
    order = batch["priority"] if "priority" in batch else batch["informative"]
    score = torch.rand(b, n, generator=generator) + 2.0 * order.cpu().float()
    device = batch["input_ids"].device
    keep_idx = score.topk(keep, dim=1).indices.sort(dim=1).values.to(device)  # [B, keep]
    first = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0, 0])
    t = batch["input_ids"].shape[1]
    pos = torch.arange(t, device=device).expand(b, t)
    out = {}
    for k in ("input_ids", "labels", "attention_mask"):
        x = batch[k]
        out[k] = torch.cat([x[:, :first], x[:, first:first + keep], x[:, first + n:]], dim=1)
    out["position_ids"] = torch.cat([pos[:, :first], first + keep_idx, pos[:, first + n:]], dim=1)
    idx = keep_idx.to(feats.device).unsqueeze(-1).expand(-1, -1, feats.shape[-1])
    return {k: v.to(feats.device) for k, v in out.items()}, feats.gather(1, idx)


def _types(names: str, where: str, known: tuple[str, ...] = QUESTION_TYPES + TRAINING_TYPES) -> tuple[str, ...]:
    types = tuple(filter(None, names.split("+")))
    unknown = set(types) - set(known)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)} in {where!r}")
    return types


def types_at(schedule: str, step: int, training_types: str = "", scored: tuple[str, ...] = QUESTION_TYPES,
             extra: tuple[str, ...] = TRAINING_TYPES) -> tuple[str, ...]:
    """Question types asked at a Stage-B step under a "until:type+type,..." schedule; after the
    schedule: the `scored` types (v2's six by default) plus the "+"-joined `training_types` (e.g. "side")."""
    for part in filter(None, schedule.split(",")):
        until, names = part.split(":")
        if step < int(until):
            return _types(names, schedule, scored + extra)
    return scored + _types(training_types, training_types, scored + extra)


def keep_at(schedule: str, step: int) -> int | None:
    """Visual tokens kept at a Stage-B step under a "until:keep,..." schedule (None: all)."""
    for part in filter(None, schedule.split(",")):
        until, keep = (int(v) for v in part.split(":"))
        if step < until:
            return keep
    return None


@torch.no_grad()
def standardize_projector(model, seed: int, device: str, n: int = 16, dense: Callable = dense_batch) -> None:
    """Data-dependent projector init: fold the per-channel mean/std of the frozen penultimate features
    into the first projector layer, so it sees standardised inputs (the raw features share a large
    common offset that would otherwise make all visual tokens look alike to the decoder)."""
    pv, _ = dense(seed, 0, n)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        feats = vision_features(model, pv.to(device)).float()
    mu, sd = feats.mean((0, 1)), feats.std((0, 1)).clamp_min(1e-3)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sd)
    lin.bias.sub_(lin.weight @ mu)


def _thermometer_readout(a: torch.Tensor, cell: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares read-out [Dv + 1, T] of a +-1 thermometer (bit j = +1 where cell >= thresholds[j]) from the
    standardised features with a bias column a [N, Dv + 1] (cell [N]), and its sign accuracy on them."""
    bits = (thresholds.unsqueeze(0) <= cell.unsqueeze(1)).float() * 2 - 1  # [N, T]
    sol = torch.linalg.lstsq(a, bits).solution  # [Dv + 1, T]
    return sol, round(((a @ sol).sign() == bits).float().mean().item(), 4)


@torch.no_grad()
def probe_projector(model, seed: int, device: str, n: int = 400, background: int = 16, iters: int = 300,
                    column_code_scale: float = 0.0, column_code_only: bool = False, row_code_scale: float = 0.0,
                    dense: Callable = dense_batch) -> dict:
    """Write linear per-patch read-outs of the frozen features into the first projector layer.

    Fits colour (7 classes incl. none), shape (5) and digit (11) logits by cross-entropy and the cell's
    (x, y) (scaled to [-2, 2]) by least squares on the penultimate features [*, Dv] of scenes 0..n-1 of
    `seed` (all object/digit patches plus `background` random patches per scene; standardised inputs),
    then sets rows 0..24 of `linear_1` to them. With `column_code_scale` > 0 it also fits a column
    thermometer (bit j = +1 if the patch's column >= j, else -1, for j = 1..grid-1) by least squares and
    writes it, times the scale, into the next grid-1 rows: a wide, strong left/right code the decoder
    can pick up (with the 2-number x read-out alone, left/right stayed at chance; docs/testbed.md).
    `column_code_only` (a trained model, `TrainConfig.init`) writes only the column rows 25..47 and
    zeroes the matching input columns of `linear_2`, so the new units start silent for the decoder.
    `row_code_scale` > 0 writes a row thermometer the same way into the rows after the column block
    (25 + grid-1 on; as many thresholds, evenly spread, as the projector has rows left, at most grid-1): the
    projector's activation loses the 1-number y read-out (docs/testbed.md, "fifth session"). With
    `column_code_only` its `linear_2` inputs are zeroed too; the column rows are kept unless
    `column_code_scale` > 0.
    Returns the probes' training accuracies.
    """
    lin = model.model.multi_modal_projector.linear_1
    gen = torch.Generator().manual_seed(seed)
    xs, xy, ys = [], [], {"colour": [], "shape": [], "digit": []}
    for start in range(0, n, 16):
        pv, target = dense(seed, start, min(16, n - start))
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            feats = vision_features(model, pv.to(device)).float().cpu()
        grid = int(round(math.sqrt(feats.shape[1])))
        for i in range(len(feats)):
            fg = ((target["colour"][i] > 0) | (target["digit"][i] > 0)).nonzero()[:, 0]
            idx = torch.cat([fg, torch.randint(0, feats.shape[1], (background,), generator=gen)])
            xs.append(feats[i, idx])
            xy.append(torch.stack([idx % grid, idx // grid], 1).float() / (grid - 1) * 4 - 2)
            for k in ys:
                ys[k].append(target[k][i, idx])
    x, xy = torch.cat(xs), torch.cat(xy)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
    xz = (x - mu) / sd
    y = {k: torch.cat(v) for k, v in ys.items()}
    heads = {"colour": nn.Linear(x.shape[1], len(COLOURS) + 1), "shape": nn.Linear(x.shape[1], len(SHAPES) + 1),
             "digit": nn.Linear(x.shape[1], 11)}
    with torch.enable_grad():
        opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=1e-2)
        for _ in range(iters):
            loss = sum(F.cross_entropy(heads[k](xz), y[k]) for k in heads)
            opt.zero_grad()
            loss.backward()
            opt.step()
    stats = {k: round((heads[k](xz).argmax(1) == y[k])[y[k] > 0].float().mean().item(), 4) for k in heads}
    a = torch.cat([xz, torch.ones(len(xz), 1)], 1)
    sol = torch.linalg.lstsq(a, xy).solution  # [Dv + 1, 2]
    stats["xy_mae_cells"] = round(((a @ sol - xy).abs().mean() * (grid - 1) / 4).item(), 3)
    w = torch.cat([heads[k].weight for k in ("colour", "shape", "digit")] + [sol[:-1].T])  # [25, Dv]
    b = torch.cat([heads[k].bias for k in ("colour", "shape", "digit")] + [sol[-1]])
    cells = torch.round((xy + 2) / 4 * (grid - 1))  # [N, 2] column, row
    if column_code_scale > 0:
        sol_c, stats["column_bits_acc"] = _thermometer_readout(a, cells[:, 0], torch.arange(1, grid))
        w = torch.cat([w, sol_c[:-1].T * column_code_scale])  # [25 + grid-1, Dv]
        b = torch.cat([b, sol_c[-1] * column_code_scale])
    rows = len(w)
    if rows > lin.weight.shape[0]:
        raise ValueError(f"projector too narrow for the probe init ({lin.weight.shape[0]} < {rows})")
    if column_code_only and column_code_scale <= 0 and row_code_scale <= 0:
        raise ValueError("column_code_only needs column_code_scale > 0 or row_code_scale > 0")
    writes = [(0, w, b)] if not column_code_only else [(25, w[25:], b[25:])] if column_code_scale > 0 else []
    if row_code_scale > 0:
        start = 25 + grid - 1  # after the column block, written now or not
        n_rows = min(grid - 1, lin.weight.shape[0] - start)
        if n_rows < 1:
            raise ValueError(f"projector too narrow for a row code ({lin.weight.shape[0]} rows; accepted: more than "
                             f"{start}, the end of the column block)")
        thresholds = torch.linspace(1, grid - 1, n_rows).round()  # [R]
        sol_r, stats["row_bits_acc"] = _thermometer_readout(a, cells[:, 1], thresholds)
        writes.append((start, sol_r[:-1].T * row_code_scale, sol_r[-1] * row_code_scale))
    mu, sd = mu.to(lin.weight), sd.to(lin.weight)
    for at, w_new, b_new in writes:  # standardised-feature weights -> raw-feature weights
        w_new, b_new = w_new.to(lin.weight), b_new.to(lin.weight)
        end = at + len(w_new)
        lin.weight[at:end] = w_new / sd
        lin.bias[at:end] = b_new - (w_new / sd) @ mu
        if column_code_only:  # new units start silent for the trained decoder
            model.model.multi_modal_projector.linear_2.weight[:, at:end] = 0
    return stats


def load_whole_model(model, source: str) -> None:
    """Copy all weights of a checkpoint ("builtin:NAME" or a directory) into `model` (same sizes)."""
    from .builtin import resolve_model

    src, _ = resolve_model(source)
    model.load_state_dict({k: v.float() for k, v in src.state_dict().items()})


def load_vision_tower(model, source: str) -> None:
    """Copy the vision tower weights of a checkpoint ("builtin:NAME" or a directory) into `model`."""
    from .builtin import resolve_model

    src, _ = resolve_model(source)
    model.model.vision_tower.load_state_dict(
        {k: v.float() for k, v in src.model.vision_tower.state_dict().items()})


@torch.no_grad()
def tower_fingerprint(model) -> str:
    """SHA-1 of the vision tower's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha1()
    for name, t in sorted(model.model.vision_tower.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def feature_cache(model, seed: int, n: int, device: str, path: Path, log: Callable[[str], None],
                  scene_pixels: Callable | None = None, bf16: bool = True) -> torch.Tensor:
    """Frozen penultimate features [n, 576, Dv] (fp16) of scenes 0..n-1 of `seed`, cached in `path`. The cache
    records the tower's fingerprint: one made by another tower (e.g. before a longer Stage A) is recomputed."""
    from .data import pixels
    from .scenes import make_scene, render

    tower = tower_fingerprint(model)
    if path.exists():  # safetensors only (never pickle); a damaged or foreign cache is recomputed
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("seed") == str(seed) and meta.get("n") == str(n) and meta.get("tower") == tower
                        and list(f.keys()) == ["feats"]):
                    return f.get_tensor("feats")
        except (SafetensorError, OSError, ValueError) as err:
            log(f"feature cache {path} unreadable ({err}); recomputing")
    out = None
    t0 = time.time()
    for start in range(0, n, 16):
        idx = range(start, min(n, start + 16))
        pv = (scene_pixels(seed, list(idx)) if scene_pixels is not None
              else pixels([render(make_scene(seed, i)) for i in idx])).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            f = vision_features(model, pv).float().cpu().half()
        if out is None:
            out = torch.empty(n, *f.shape[1:], dtype=torch.float16)
        out[start:start + len(f)] = f
        if start % 800 == 0:
            log(f"feature cache {start}/{n} ({time.time() - t0:.0f}s)")
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"feats": out}, str(tmp), metadata={"seed": str(seed), "n": str(n), "tower": tower})
    tmp.replace(path)
    return out


def decoder_hidden(model, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None, image_feats: torch.Tensor | None = None,
                   all_layers: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Decoder output [B, T, D] for image features [B, N, Dv] placed at the N `<image>` ids of input_ids [B, T]
    (projected here unless `image_feats` [B, N, D], the projector's output, is given). `all_layers`: the tuple
    (embeddings, layer 1 output, ..., final norm output) instead, each [B, T, D]."""
    if image_feats is None:
        image_feats = model.model.multi_modal_projector(feats)
    embeds = model.model.language_model.get_input_embeddings()(input_ids)
    mask = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_feats.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=position_ids, output_hidden_states=all_layers)
    return tuple(out.hidden_states) if all_layers else out.last_hidden_state


def lm_loss(model, feats: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
            image_feats: torch.Tensor | None = None,
            hidden_states: list | None = None) -> tuple[torch.Tensor, float]:
    """Projector + decoder on image features [B, N, Dv] and packed ids [B, T] (N image tokens);
    next-token CE on the labelled tokens (answers and their eos). `image_feats` [B, N, D]: the projector's
    output, if already computed. Returns (loss, accuracy on the answer tokens alone): each answer's eos is
    trivially predicted and would lift a token accuracy halfway to 1 (0.75 for half the answers right).
    `hidden_states`: a list that receives every layer's hidden states (`decoder_hidden(all_layers=True)`)."""
    if hidden_states is None:
        hidden = decoder_hidden(model, feats, input_ids, attention_mask, position_ids, image_feats)
    else:
        hidden_states.extend(decoder_hidden(model, feats, input_ids, attention_mask, position_ids, image_feats,
                                            all_layers=True))
        hidden = hidden_states[-1]
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel]).float()
    loss = F.cross_entropy(logits, target[sel])
    hit = logits.argmax(-1) == target[sel]
    answer = target[sel] != model.config.text_config.eos_token_id
    return loss, hit[answer].float().mean().item()  # nan when the batch has no answer token


class TokenXYHead(nn.Module):
    """Training-only Stage-B read-out of the patch's cell (x, y) from the projector's output.

    Without it nothing in Stage B asks the projector to keep where a patch is until left/right questions
    can use it, and the position the probe init writes into the first projector rows is lost within a few
    hundred steps (measured: the column of an object patch, linearly read from the projected token,
    went from ±0.4 to ±4 cells), so left/right never leaves chance. Not part of the shipped model.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.xy = nn.Linear(width, 2)

    def loss(self, image_feats: torch.Tensor, patch_index: torch.Tensor, informative: torch.Tensor) -> torch.Tensor:
        """image_feats [B, N, D] of patches `patch_index` [B, N] (raster indices into the 24x24 grid);
        informative [B, N] bool. MSE of (x, y) in [0, 1] over informative patches."""
        grid = int(round(math.sqrt(NUM_PATCHES)))
        target = torch.stack([patch_index % grid, patch_index // grid], -1).float() / (grid - 1)
        err = (self.xy(image_feats.float()) - target).square().sum(-1)  # [B, N]
        w = informative.float()
        return (err * w).sum() / w.sum().clamp_min(1)


def fit_dense_heads(model, heads: DenseHeads, share_head: nn.Module | None, batches: Callable, cfg: TrainConfig,
                    device: str, amp, world: int = 1, rank: int = 0, place_head: nn.Module | None = None) -> dict:
    """Fit Stage A's training-only heads (and `share_head`, the tower's object-share read-out, when given) on the
    frozen tower: `cfg.head_fit_steps` Adam steps, lr `cfg.lr_a`, on `cfg.batch_a` scenes of the Stage A seed per
    step (the scenes after Stage A's), so that a Stage B that trains the tower (`tower_lr_b`) starts its dense losses
    from read-outs that fit, not from random heads whose gradients would disturb the tower. `batches(start, n)`
    gives pixel_values, dense_* and share (`data_v3.question_batch`'s keys); `place_head`, the digit-place read-out,
    is fitted too when given. Returns the last step's statistics."""
    extra = [m for m in (share_head, place_head) if m is not None]
    params = list(heads.parameters()) + [p for m in extra for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr_a, weight_decay=0.0)
    per = cfg.batch_a // world
    stats: dict = {}
    for step in range(cfg.head_fit_steps):
        batch = batches((cfg.steps_a + step) * cfg.batch_a + rank * per, per)
        with torch.no_grad(), amp:
            feats = vision_features(model, batch["pixel_values"].to(device))
        target = {k: batch[f"dense_{k}"].to(device) for k in ("colour", "shape", "digit", "xy")}
        loss, stats = heads.loss(feats.float(), target, cfg.xy_object_weight)
        if share_head is not None:
            share_loss, stats["tower-count-err"] = tower_count_loss(cfg.tower_count_target, share_head(feats.float()),
                                                                    batch, cfg.centre_sum_weight)
            loss = loss + share_loss
        if place_head is not None:
            place_loss, stats["digit-place"] = patch_classification(place_head(feats.float()),
                                                                    batch["dense_place"].to(device))
            loss = loss + place_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(params)
        opt.step()
    return {k: round(v, 4) for k, v in stats.items()}


def _schedule(step: int, total: int, warmup: int, time_done: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up, then a cosine from 1 to 0.1 over the steps after it, or over the time
    budget when `time_done` (the share of it used) is further along."""
    if step < warmup:
        return (step + 1) / warmup
    done = max(min(1.0, (step - warmup) / max(1, total - warmup)), min(1.0, time_done))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from vtprune.progress import Progress  # rich in a terminal, plain periodic lines in a log

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


def count_attention_heads(spec: str, layers: int, heads: int) -> list[tuple[int, int]]:
    """[(layer, head)] of `TrainConfig.count_attention_heads` ("LAYER:HEAD,...", layers 1-based, heads 0-based), checked
    against a decoder of `layers` layers with `heads` heads."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        layer, sep, head = item.partition(":")
        if not (sep and layer.isdigit() and head.isdigit() and 0 < int(layer) <= layers and int(head) < heads):
            raise ValueError(f"count_attention_heads entry {item!r} is not LAYER:HEAD (accepted: layers 1..{layers}, "
                             f"heads 0..{heads - 1}, comma-separated)")
        out.append((int(layer), int(head)))
    return out


def count_marks(cfg: TrainConfig) -> tuple[str, ...]:
    """`TrainConfig.count_mark` as a tuple of `scenes_v3.COUNT_MARKS`; ValueError names a bad one."""
    marks = tuple(cfg.count_mark.split("+"))
    bad = [m for m in marks if m not in COUNT_MARKS]
    if bad or len(set(marks)) < len(marks):
        raise ValueError(f"count_mark {cfg.count_mark!r} is not a '+'-joined list of distinct marks (accepted: "
                         f"{', '.join(COUNT_MARKS)})")
    return marks


def centre_target_kwargs(cfg: TrainConfig) -> dict:
    """`data_v3.question_batch`'s options for the centre targets that differ from its defaults (v2's batches have
    none of them)."""
    marks = count_marks(cfg)
    out = {"centre_spread": cfg.centre_spread} if cfg.centre_spread > 0 else {}
    return out | ({"count_marks": marks} if marks != ("centre",) else {})


def _target_layer(cfg: TrainConfig, name: str, default: int, default_text: str, carries: str) -> int:
    """The decoder layer (1-based) of the attention target `name` ("count_attention": `count_attention_weight` /
    `count_attention_layer`, 0 meaning `default`); checked when its weight is on: a decoder layer, shapes-v3 data."""
    layer = getattr(cfg, f"{name}_layer") or default
    if getattr(cfg, f"{name}_weight") > 0:
        if not 0 < layer <= cfg.size.text_layers:
            raise ValueError(f"{name}_layer {getattr(cfg, f'{name}_layer')} is not a decoder layer "
                             f"(accepted: 1..{cfg.size.text_layers}, or 0 for {default_text})")
        if cfg.data != "shapes-v3":
            raise ValueError(f"{name}_weight > 0 needs shapes-v3 data (its batches carry {carries}), got {cfg.data}")
    return layer


def train(out: str | Path, config: TrainConfig | None = None, device: str = "cpu",
          log: Callable[[str], None] = print, progress: bool = True):
    """Run (or resume) both stages into `out`; returns the final model. The best Stage-B model by
    (worst type, overall) on the held-out eval set is exported to `out/model` with the processor."""
    cfg = config or TrainConfig()
    rank, world = parallel.rank_world()
    if cfg.procs != world:
        raise ValueError(f"procs={cfg.procs} but this process group has {world} process(es); "
                         f"use parallel_launch.train_parallel (the CLI's --procs) for procs > 1")
    for name, size in (("batch_a", cfg.batch_a), ("batch_b", cfg.batch_b), ("single_batch", cfg.single_batch)):
        if size % world:
            raise ValueError(f"{name}={size} is not divisible by procs={world}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ds = get_dataset(cfg.data)
    model = ds.build_model(cfg.size, cfg.seed).to(device)
    if cfg.init and cfg.vision_init:
        raise ValueError("give either init (whole model) or vision_init (tower only), not both")
    if cfg.init:
        load_whole_model(model, cfg.init)
    if cfg.vision_init:
        load_vision_tower(model, cfg.vision_init)
    processor = ds.build_processor()
    heads = DenseHeads(cfg.size.vision_width).to(device)
    amp = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if cfg.bf16
           else nullcontext())
    state_root = out / "state"  # atomic, manifest-checked checkpoints (vtprune.checkpointing); never pickle
    legacy_state = out / "state.pt"
    fresh_hint = f"delete {legacy_state if legacy_state.exists() else state_root} (or use another output folder)"
    serial = 0  # checkpoint counter: state/step-XXXXXXXX
    st = {"stage": "A", "step": 0, "wall": 0.0, "history": [], "best": None}
    opt_a = torch.optim.AdamW(list(model.model.vision_tower.parameters()) + list(heads.parameters()),
                              lr=cfg.lr_a, weight_decay=cfg.weight_decay)
    token_xy = TokenXYHead(cfg.size.text_width).to(device)
    b_params = (list(model.model.multi_modal_projector.parameters())
                + list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    opt_b = torch.optim.AdamW(b_params, lr=cfg.lr_b, weight_decay=cfg.weight_decay)
    opt_xy = torch.optim.AdamW(token_xy.parameters(), lr=cfg.lr_b, weight_decay=0.0)
    fetch_layer = cfg.fetch_layer or max(1, cfg.size.text_layers // 2)
    if cfg.fetch_weight > 0 and not 0 < fetch_layer <= cfg.size.text_layers:
        raise ValueError(f"fetch_layer {cfg.fetch_layer} is not a decoder layer "
                         f"(accepted: 1..{cfg.size.text_layers}, or 0 for half the depth)")
    if cfg.fetch_second and cfg.fetch_weight <= 0:
        raise ValueError("fetch_second adds a target to the fetch read-out: it needs fetch_weight > 0")
    readout = AnswerReadout(cfg.size.text_width, fetch_layer, second=cfg.fetch_second).to(device)
    opt_readout = torch.optim.AdamW(readout.parameters(), lr=cfg.lr_b, weight_decay=0.0)
    count_layer = cfg.count_layer or 1
    if cfg.count_weight > 0 and not 0 < count_layer <= cfg.size.text_layers:
        raise ValueError(f"count_layer {cfg.count_layer} is not a decoder layer "
                         f"(accepted: 1..{cfg.size.text_layers}, or 0 for the first)")
    if cfg.count_weight > 0 and cfg.data != "shapes-v3":
        raise ValueError(f"count_weight > 0 needs shapes-v3 data (its batches carry the count targets), got {cfg.data}")
    count_attention_layer = _target_layer(cfg, "count_attention", max(1, cfg.size.text_layers - 1),
                                          "the last but one", "the centre targets")
    count_heads = [(count_attention_layer, 0)] + count_attention_heads(cfg.count_attention_heads, cfg.size.text_layers,
                                                                       cfg.size.text_heads)  # fmt: skip
    if cfg.count_attention_heads and cfg.count_attention_weight <= 0:
        raise ValueError("count_attention_heads adds heads to the count target: it needs count_attention_weight > 0")
    if len(set(count_heads)) < len(count_heads):
        raise ValueError(f"count_attention_heads {cfg.count_attention_heads!r} repeats a head (head 0 of layer "
                         f"{count_attention_layer} is the count target's own)")
    fetch_attention_layer = _target_layer(cfg, "fetch_attention", max(1, cfg.size.text_layers // 2),
                                          "half the depth", "the objects' patches")
    if cfg.fetch_attention_at not in ("answer", "name"):
        raise ValueError(f"unknown fetch_attention_at {cfg.fetch_attention_at!r} (accepted: answer, name)")
    if cfg.fetch_attention_weight > 0 and cfg.fetch_attention_at == "answer" and cfg.size.text_heads < 2:
        raise ValueError(f"fetch_attention_weight > 0 gives two heads of a layer different targets: it needs a decoder "
                         f"with at least 2 heads, got {cfg.size.text_heads}")
    if not cfg.count_sink_weight > 0:
        raise ValueError(f"count_sink_weight must be > 0 (the count attention target's weight on <s>), "
                         f"got {cfg.count_sink_weight}")
    relay_layer = cfg.fetch_relay_layer or fetch_attention_layer + 1
    if cfg.fetch_attention_weight > 0 and cfg.fetch_attention_at == "name" and not (
            fetch_attention_layer < relay_layer <= cfg.size.text_layers):
        raise ValueError(f"fetch_attention_at 'name' puts its relay target in a layer after fetch_attention_layer "
                         f"{fetch_attention_layer}: fetch_relay_layer {relay_layer} is not in "
                         f"{fetch_attention_layer + 1}..{cfg.size.text_layers} (0: the next layer)")
    arrived = relay_layer if cfg.fetch_attention_at == "name" else fetch_attention_layer  # the named object's there
    if cfg.fetch_neighbour_layer and not (cfg.fetch_attention_weight > 0
                                          and arrived < cfg.fetch_neighbour_layer <= cfg.size.text_layers):
        raise ValueError(f"fetch_neighbour_layer {cfg.fetch_neighbour_layer} needs fetch_attention_weight > 0 and a "
                         f"layer after the one that brings the named object to the answer position (accepted: "
                         f"{arrived + 1}..{cfg.size.text_layers}, or 0 for none)")
    if cfg.count_attention_at not in ("answer", "name"):
        raise ValueError(f"unknown count_attention_at {cfg.count_attention_at!r} (accepted: answer, name)")
    if cfg.count_attention_unit not in ("centre", "object"):
        raise ValueError(f"unknown count_attention_unit {cfg.count_attention_unit!r} (accepted: centre, object)")
    counting_at_name = cfg.count_attention_weight > 0 and cfg.count_attention_at == "name"
    if counting_at_name and not (cfg.fetch_attention_weight > 0 and cfg.fetch_attention_at == "name"
                                 and count_attention_layer < relay_layer):
        raise ValueError(f"count_attention_at 'name' needs the fetch targets' relay to bring the count to the answer: "
                         f"fetch_attention_weight > 0, fetch_attention_at 'name' and count_attention_layer "
                         f"{count_attention_layer} before the relay's layer {relay_layer}")
    # the count targets (share / centre / count) only when a read-out uses them; v2's question_batch has no such option
    count_kwargs = ({"with_counts": True} if cfg.count_weight > 0 or cfg.tower_share_weight > 0
                    or cfg.count_attention_weight > 0 else {})
    if cfg.centre_spread < 0:
        raise ValueError(f"centre_spread {cfg.centre_spread} is negative (accepted: 0, the centre patch, or a side in "
                         f"pixels)")
    marks = count_marks(cfg)
    if marks != ("centre",) and cfg.centre_spread > 0:
        raise ValueError(f"centre_spread spreads the centre mark: count_mark must be 'centre', got {cfg.count_mark!r}")
    if len(marks) > 1 and cfg.count_attention_weight > 0 and len(count_heads) != len(marks):
        raise ValueError(f"count_mark {cfg.count_mark!r} has {len(marks)} marks, one per count head: give "
                         f"{len(marks) - 1} heads in count_attention_heads (got {len(count_heads) - 1})")
    if len(marks) > 1 and cfg.tower_share_weight > 0 and cfg.tower_count_target != "centre":
        raise ValueError(f"count_mark {cfg.count_mark!r} marks each object M times: the tower's count target must "
                         f"be 'centre' (got {cfg.tower_count_target!r})")
    if len(marks) > 1 and cfg.count_attention_unit != "centre":
        raise ValueError("count_attention_unit 'object' counts whole objects: it takes no count_mark list")
    if count_kwargs:
        count_kwargs |= centre_target_kwargs(cfg)
    if cfg.fetch_attention_weight > 0:
        count_kwargs["with_fetch_cover"] = True
    counter = CountReadout(cfg.size.text_width, len(COLOURS) + len(SHAPES), count_layer).to(device)
    opt_counter = torch.optim.AdamW(counter.parameters(), lr=cfg.lr_b, weight_decay=0.0)
    tuning = cfg.tower_lr_b > 0  # Stage B trains the tower too
    if tuning and cfg.feature_cache > 0:
        raise ValueError(f"tower_lr_b > 0 trains the tower in Stage B, so its features cannot be cached: "
                         f"set feature_cache 0 (got {cfg.feature_cache}; the CLI's --feature-cache 0)")
    if tuning and cfg.data != "shapes-v3":
        raise ValueError(f"tower_lr_b > 0 needs shapes-v3 data (its batches carry the dense targets), got {cfg.data}")
    if cfg.tower_count_target not in ("share", "centre"):
        raise ValueError(f"tower_count_target {cfg.tower_count_target!r} is unknown; accepted: share, centre")
    if cfg.centre_sum_weight < 0 or (cfg.centre_sum_weight > 0 and cfg.tower_count_target != "centre"):
        raise ValueError(f"centre_sum_weight {cfg.centre_sum_weight} needs tower_count_target 'centre' and must be "
                         f">= 0 (got tower_count_target {cfg.tower_count_target!r})")
    if cfg.tower_place_weight > 0 and not tuning:
        raise ValueError("tower_place_weight > 0 reads the tower's features while Stage B trains it: "
                         "it needs tower_lr_b > 0")
    if cfg.cls_before_b and tuning:
        raise ValueError("cls_before_b needs a frozen tower in Stage B (tower_lr_b 0): training it would undo the "
                         f"tuned [CLS] attention; got tower_lr_b {cfg.tower_lr_b}")
    if cfg.cls_before_b and world > 1:
        raise ValueError("cls_before_b runs Stage C in one process: use procs 1")
    if cfg.tower_share_weight > 0 and not tuning:
        raise ValueError("tower_share_weight > 0 reads the tower's features while Stage B trains it: "
                         "it needs tower_lr_b > 0")
    tower_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt_tower = torch.optim.AdamW(tower_params, lr=cfg.tower_lr_b, weight_decay=cfg.weight_decay)
    # training-only: each mark's classes (share: one set)
    tower_share = nn.Linear(cfg.size.vision_width, len(marks) * (len(COLOURS) + len(SHAPES))).to(device)
    tower_place = nn.Linear(cfg.size.vision_width, 21).to(device)  # training-only: digit and its place
    place_params = list(tower_place.parameters()) if cfg.tower_place_weight > 0 else []
    opt_tower_share = torch.optim.AdamW(list(tower_share.parameters()) + place_params, lr=cfg.tower_lr_b,
                                        weight_decay=0.0)
    if cfg.tower_share_weight > 0:
        tower_params = tower_params + list(tower_share.parameters())  # averaged over processes with the tower's
    tower_params = tower_params + place_params
    if legacy_state.exists():
        raise cpt.CheckpointError(
            f"{legacy_state} is a pickle checkpoint of an older vtprune, which is no longer loaded (unpickling can run "
            f"code); to start fresh, {fresh_hint}"
        )
    if cfg.ema_decay and not (0.0 < cfg.ema_decay < 1.0 and cfg.export_final):
        raise ValueError(f"ema_decay {cfg.ema_decay} needs export_final and a decay in (0, 1) (0: off)")
    ema: WeightEMA | None = None  # Stage B's weight average, started when Stage B starts
    folder = cpt.latest(state_root, fresh_hint)
    if folder is not None:
        saved = cpt.load_state(folder, "state", device)
        try:
            model.load_state_dict(saved["model"])
            heads.load_state_dict(saved["heads"])
            opt_a.load_state_dict(saved["opt_a"])
            if saved["opt_b"] is not None:  # None: Stage B restarted from scratch
                opt_b.load_state_dict(saved["opt_b"])
            if saved.get("token_xy") is not None:
                token_xy.load_state_dict(saved["token_xy"])
                opt_xy.load_state_dict(saved["opt_xy"])
            if saved.get("readout") is not None:  # absent in states written before answer_readout.py
                readout.load_state_dict(saved["readout"])
                opt_readout.load_state_dict(saved["opt_readout"])
            if saved.get("counter") is not None:  # absent in states written before count_readout.py
                counter.load_state_dict(saved["counter"])
                opt_counter.load_state_dict(saved["opt_counter"])
            if saved.get("opt_tower") is not None:  # absent in states written before tower_lr_b
                opt_tower.load_state_dict(saved["opt_tower"])
            if saved.get("tower_share") is not None:  # absent in states written before tower_share_weight
                tower_share.load_state_dict(saved["tower_share"])
                opt_tower_share.load_state_dict(saved["opt_tower_share"])
            if saved.get("tower_place") is not None:  # absent in states written before tower_place_weight
                tower_place.load_state_dict(saved["tower_place"])
            if saved.get("ema") is not None and cfg.ema_decay > 0:  # absent before ema_decay and when it is off
                ema = WeightEMA(model, cfg.ema_decay)
                ema.load_state_dict(saved["ema"])
            st = saved["st"]
            st["stage"], st["step"] = str(st["stage"]), int(st["step"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            why = str(err)[:200]
            raise cpt.CheckpointError(f"{folder}: state does not fit this run ({why}); {fresh_hint}") from None
        serial = int(folder.name.split("-")[1])
        ended = st.get("target_reached") or (cfg.export_final and st.get("time_up"))
        if st["stage"] == "done" and st["step"] < cfg.steps_b and not ended:
            st["stage"] = "B"  # resumed with a longer Stage B
            st["final_exported"] = False  # its end exports the final model again
            # a new best export needs Stage C again; run before Stage B (cls_before_b), it stays done
            st["cls_done"] = cfg.cls_before_b and st.get("cls_done", False)
        log(f"resumed: stage {st['stage']} step {st['step']}")
    (out / "train_config.json").write_text(cpt.dumps_strict(cfg.to_dict(), indent=2))

    parallel.barrier()  # every process has read the latest state before rank 0 writes a newer one

    def save() -> None:
        nonlocal serial
        if rank != 0:
            return
        serial += 1
        state = {"model": model.state_dict(), "heads": heads.state_dict(), "opt_a": opt_a.state_dict(),
                 "opt_b": opt_b.state_dict(), "token_xy": token_xy.state_dict(), "opt_xy": opt_xy.state_dict(),
                 "readout": readout.state_dict(), "opt_readout": opt_readout.state_dict(),
                 "counter": counter.state_dict(), "opt_counter": opt_counter.state_dict(),
                 "opt_tower": opt_tower.state_dict(), "tower_share": tower_share.state_dict(),
                 "opt_tower_share": opt_tower_share.state_dict(), "tower_place": tower_place.state_dict(), "st": st,
                 "ema": ema.state_dict() if ema is not None else None}
        cpt.write(state_root, serial, cpt.state_files("state", state))

    def stage_c(target, when: str) -> None:
        """Stage C (cls_saliency.py): `target`'s [CLS] embedding trained in place, recorded in the history."""
        from .cls_saliency import tune_cls_embedding

        stats = tune_cls_embedding(target, cfg.cls_steps, cfg.cls_lr, seed=cfg.seed + 3, eval_seed=cfg.eval_seed,
                                   device=device, log=log, dense=ds.dense_batch, drift_weight=cfg.cls_drift_weight)
        st["history"].append({"stage": "C", "step": cfg.cls_steps, **stats})
        st["cls_done"] = True
        log(f"Stage C ([CLS] attention){when}: {stats}")

    eval_set = ds.watched_samples(cfg.eval_seed, cfg.eval_per_type)
    bar = _progress() if progress else None
    ctx = bar if bar is not None else nullcontext()
    with ctx:
        # ---- Stage A: vision tower with dense per-patch targets ----
        if st["stage"] == "A":
            model.train()
            task = bar.add_task("stage A", total=cfg.steps_a, completed=st["step"], info="") if bar else None
            while st["step"] < cfg.steps_a:
                t0 = time.time()
                per = cfg.batch_a // world  # this process's share of the step's scenes
                pv, target = ds.dense_batch(cfg.seed, st["step"] * cfg.batch_a + rank * per, per)
                pv, target = pv.to(device), {k: v.to(device) for k, v in target.items()}
                for g in opt_a.param_groups:
                    g["lr"] = cfg.lr_a * _schedule(st["step"], cfg.steps_a, cfg.warmup)
                with amp:
                    loss, stats = heads.loss(vision_features(model, pv), target, cfg.xy_object_weight)
                opt_a.zero_grad(set_to_none=True)
                loss.backward()
                parallel.average_gradients(list(model.model.vision_tower.parameters()) + list(heads.parameters()))
                torch.nn.utils.clip_grad_norm_(model.model.vision_tower.parameters(), 1.0)
                opt_a.step()
                st["step"] += 1
                st["wall"] += time.time() - t0
                info = f"loss {loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in stats.items())
                if bar:
                    bar.update(task, completed=st["step"], info=info)
                if st["step"] % 25 == 0 or st["step"] == cfg.steps_a:
                    st["history"].append({"stage": "A", "step": st["step"], "wall": round(st["wall"], 1),
                                          "loss": round(loss.item(), 4), **stats})
                    log(f"A {st['step']} {st['wall']:.0f}s {info}")
                if st["step"] % cfg.save_every == 0:
                    save()
            st["stage"], st["step"] = "B", 0
            st["heads_fitted"] = cfg.steps_a > 0  # Stage A trained them
            save()
        # ---- Stage B: projector + decoder on packed questions; the tower frozen unless tower_lr_b > 0 ----
        if cfg.cls_before_b and cfg.cls_steps > 0 and not st.get("cls_done") and st["stage"] == "B":
            stage_c(model, " before Stage B")  # ---- Stage C first: the starting model's [CLS] embedding ----
            save()
        packing = Packing(cfg.questions_per_image)
        single_packing = Packing(1)
        model.model.vision_tower.requires_grad_(False)
        model.train()
        model.model.vision_tower.eval()
        share_unfitted = cfg.tower_share_weight > 0 and not st.get("share_fitted")
        place_unfitted = cfg.tower_place_weight > 0 and not st.get("place_fitted")
        if tuning and (not st.get("heads_fitted") or share_unfitted or place_unfitted) and st["stage"] == "B":
            share_head = tower_share if cfg.tower_share_weight > 0 else None
            place_head = tower_place if cfg.tower_place_weight > 0 else None
            with_share = {"with_counts": True, **centre_target_kwargs(cfg)} if share_head is not None else {}

            def fit_batches(start: int, n: int) -> dict:
                return ds.question_batch(cfg.seed, start, n, Packing(1), with_dense=True, **with_share)

            stats = fit_dense_heads(model, heads, share_head, fit_batches, cfg, device, amp, world, rank, place_head)
            st["history"].append({"stage": "heads", "step": cfg.head_fit_steps, **stats})
            log(f"Stage A heads fitted on the frozen tower for {cfg.head_fit_steps} steps: {stats}")
            st["heads_fitted"] = True
            st["share_fitted"] = share_head is not None
            st["place_fitted"] = place_head is not None
        if tuning:
            model.model.vision_tower.requires_grad_(True)
            model.model.vision_tower.train()
        if not st.get("projector_standardized") and cfg.init:
            if cfg.column_code_scale > 0 or cfg.row_code_scale > 0:  # a trained projector: only add the codes
                stats = probe_projector(model, cfg.seed, device, n=cfg.probe_scenes,
                                        column_code_scale=cfg.column_code_scale, column_code_only=True,
                                        row_code_scale=cfg.row_code_scale,
                                        dense=ds.dense_batch)
                st["history"].append({"stage": "probe", "step": 0, "wall": round(st["wall"], 1), **stats})
                log(f"projector code rows (column / row thermometers): {stats}")
            st["projector_standardized"] = True
        if not st.get("projector_standardized"):
            standardize_projector(model, cfg.seed + 2, device, dense=ds.dense_batch)
            if cfg.projector_init == "probe":
                stats = probe_projector(model, cfg.seed, device, n=cfg.probe_scenes,
                                        column_code_scale=cfg.column_code_scale,
                                        row_code_scale=cfg.row_code_scale, dense=ds.dense_batch)
                st["history"].append({"stage": "probe", "step": 0, "wall": round(st["wall"], 1), **stats})
                log(f"projector probe init: {stats}")
            elif cfg.projector_init != "standardize":
                raise ValueError(f"unknown projector_init {cfg.projector_init!r}")
            st["projector_standardized"] = True
        parallel.broadcast_module(model)  # the data-dependent inits ran on every process: keep rank 0's
        cache = None
        for turn in (0, 1) if cfg.feature_cache > 0 else ():  # rank 0 computes and writes it, the others read it
            if (rank == 0) == (turn == 0):
                cache = feature_cache(model, cfg.seed + 1, cfg.feature_cache, device, out / "features.safetensors",
                                      log, scene_pixels=ds.scene_pixels, bf16=cfg.bf16)
            parallel.barrier()
        def types(step: int) -> tuple[str, ...]:
            return types_at(cfg.type_schedule, step, cfg.training_types, ds.question_types, ds.training_types)

        task = bar.add_task("stage B", total=cfg.steps_b, completed=st["step"], info="") if bar else None
        b_start_wall = st.get("b_wall0", st["wall"])
        if cfg.ema_decay > 0 and ema is None:
            ema = WeightEMA(model, cfg.ema_decay)  # from the weights Stage B starts with
        st["b_wall0"] = b_start_wall
        while st["step"] < cfg.steps_b and st["stage"] == "B":
            t0 = time.time()
            single = st["step"] < cfg.single_steps
            size_b, pack = (cfg.single_batch, single_packing) if single else (cfg.batch_b, packing)
            per = size_b // world  # this process's share of the step's scenes
            first = st.get("scenes_b", st["step"] * cfg.batch_b)  # Stage-B scenes read so far
            if cache is not None:  # cycle over the cached scenes, new questions on every pass
                idx = parallel.share(rank, per, [(first + i) % len(cache) for i in range(size_b)])
                batch = ds.question_batch(cfg.seed + 1, 0, 0, pack, indices=idx, salt=first // len(cache),
                                          with_pixels=False, types=types(st["step"]), **count_kwargs)
            else:
                batch = ds.question_batch(cfg.seed + 1, first + rank * per, per, pack, types=types(st["step"]),
                                          **count_kwargs, **({"with_dense": True} if tuning else {}))
            st["scenes_b"] = first + size_b
            batch = {k: v.to(device) for k, v in batch.items()}
            time_done = 0.0
            if cfg.anneal_by_time and cfg.time_limit_b > 0:  # rank 0's clock, as for the time limit itself
                time_done = parallel.broadcast_value((st["wall"] - b_start_wall) / cfg.time_limit_b)
            lr_factor = _schedule(st["step"], cfg.steps_b, cfg.warmup, time_done)
            for g in opt_b.param_groups:
                g["lr"] = cfg.lr_b * lr_factor
            for g in opt_tower.param_groups + opt_tower_share.param_groups:
                g["lr"] = cfg.tower_lr_b * lr_factor
            with amp:
                dense_loss = None
                if cache is not None:
                    feats = cache[idx].to(device).float()
                elif tuning:  # the tower trains: its features carry gradients, Stage A's loss keeps them readable
                    feats = vision_features(model, batch["pixel_values"])
                    dense_loss, dense_stats = heads.loss(
                        feats, {k: batch[f"dense_{k}"] for k in ("colour", "shape", "digit", "xy")},
                        cfg.xy_object_weight)
                    if cfg.tower_share_weight > 0:
                        tower_share_loss, dense_stats["tower-count-err"] = tower_count_loss(
                            cfg.tower_count_target, tower_share(feats.float()), batch, cfg.centre_sum_weight)
                        dense_loss = dense_loss + cfg.tower_share_weight * tower_share_loss
                    if cfg.tower_place_weight > 0:
                        place_loss, dense_stats["digit-place"] = patch_classification(tower_place(feats.float()),
                                                                                      batch["dense_place"])
                        dense_loss = dense_loss + cfg.tower_place_weight * place_loss
                else:
                    with torch.no_grad():
                        feats = vision_features(model, batch["pixel_values"])
                keep = keep_at(cfg.keep_schedule, st["step"])
                short = keep is not None
                if short:
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st["step"] + 7_919 * rank)
                    text, feats = shorten(batch, feats, keep, gen)
                    img0 = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0, 0])
                    patch_index = text["position_ids"][:, img0:img0 + keep] - img0  # [B, keep]
                else:
                    text = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
                    patch_index = torch.arange(feats.shape[1], device=device).expand(feats.shape[0], -1)
                image_feats = model.model.multi_modal_projector(feats)
                fetching = cfg.fetch_weight > 0
                if fetching and "fetch" not in batch:
                    raise ValueError(f"fetch_weight > 0 needs batches with fetch targets ({cfg.data} has none)")
                counting = cfg.count_weight > 0
                attending = cfg.count_attention_weight > 0
                seeking = cfg.fetch_attention_weight > 0
                hidden: list | None = [] if fetching or counting or attending or seeking else None
                loss, acc = lm_loss(model, feats, **text, image_feats=image_feats, hidden_states=hidden)
                if world > 1:  # weigh by this process's share of the answer tokens: the mean gradient is the batch's
                    answers = float((text["labels"][:, 1:] != -100).sum())
                    loss = loss * (answers * world / parallel.total(answers))
                if cfg.token_xy_weight > 0:
                    informative = batch["informative"].to(device).gather(1, patch_index)
                    xy_loss = token_xy.loss(image_feats, patch_index, informative)
                    loss = loss + cfg.token_xy_weight * xy_loss
                if fetching:
                    fetch_loss, fetch_cells, targets, second_cells = readout.loss(
                        hidden, text["labels"], batch["fetch"], model.config.text_config.eos_token_id,
                        batch.get("second_named"))
                    if world > 1:  # as the answer loss: the mean gradient over processes is the whole batch's
                        fetch_loss = fetch_loss * (targets * world / max(parallel.total(targets), 1.0))
                    loss = loss + cfg.fetch_weight * fetch_loss
                if counting:
                    share_loss, count_loss, implied, counts = counter.loss(
                        hidden, text["input_ids"], model.config.image_token_id, patch_index, text["labels"],
                        batch["share"], batch["count"], model.config.text_config.eos_token_id)
                    if world > 1:  # every process has the same number of scenes; count answers as the answer loss
                        count_loss = count_loss * (counts * world / max(parallel.total(counts), 1.0))
                    loss = loss + cfg.count_weight * (share_loss + count_loss)
                if attending:
                    rows, pos, slot = answer_positions(text["labels"], model.config.text_config.eos_token_id,
                                                       batch["count_channel"].shape[1])
                    at = pos + batch["count_offsets"][rows, slot] if counting_at_name else pos  # [K]
                    channel = batch["count_channel"][rows, slot]  # [K]: the counted column, -1 for none
                    per_head = [count_attention_loss(  # (loss, mass, answers); with M marks head i learns mark i
                        model, layer, head, hidden[layer - 1], text["input_ids"], text.get("position_ids"), rows, at,
                        torch.where(channel >= 0, channel + (i % len(marks)) * (len(COLOURS) + len(SHAPES)), channel),
                        batch["centre"], patch_index, cfg.count_sink_weight,
                        batch["groups"] if cfg.count_attention_unit == "object" else None)
                        for i, (layer, head) in enumerate(count_heads)]  # fmt: skip
                    attention_loss = sum(loss for loss, _, _ in per_head)
                    attention_mass = sum(mass for _, mass, _ in per_head) / len(per_head)  # the mean over the heads
                    attention_n = per_head[0][2]  # the same count answers for every head
                    if world > 1:  # as the answer loss: the mean gradient over processes is the whole batch's
                        attention_loss = attention_loss * (attention_n * world / max(parallel.total(attention_n), 1.0))
                    loss = loss + cfg.count_attention_weight * attention_loss
                if seeking:
                    rows, pos, slot = answer_positions(text["labels"], model.config.text_config.eos_token_id,
                                                       batch["fetch_cover"].shape[1])
                    cover = batch["fetch_cover"][rows, slot]  # [K, 3, 576]: named, named second, left neighbour
                    seek_loss, seek_n, seek_mass = 0.0, 0, {}
                    by_name = cfg.fetch_attention_at == "name"
                    offsets = batch["name_offsets"][rows, slot]  # [K, 2]: the name ends, 0: none
                    if counting_at_name:  # a count question's phrase end: relayed like a name's
                        offsets = offsets.clone()
                        offsets[:, 0] += batch["count_offsets"][rows, slot]  # count questions name no object
                    sources = (pos[:, None] + offsets).masked_fill(offsets == 0, 0)  # [K, 2]
                    for which in (0, 1):
                        # "name": head 0 at the name's end (a number's two digits: heads 0 and last at the answer)
                        at = pos + offsets[:, which] if by_name else pos  # offset 0: the answer position
                        seek_heads = torch.full_like(pos, cfg.size.text_heads - 1 if which else 0)
                        if by_name:
                            seek_heads = seek_heads.masked_fill(offsets[:, which] != 0, 0)
                        part, mass, n = fetch_attention_loss(
                            model, fetch_attention_layer, seek_heads, hidden[fetch_attention_layer - 1],
                            text["input_ids"], text.get("position_ids"), rows, at, cover[:, which], patch_index,
                            None if which else batch["fetch_sink"][rows, slot])
                        seek_loss, seek_n = seek_loss + part * n, seek_n + n
                        seek_mass["on-second" if which else "on-named"] = mass
                    if by_name:  # the second hop: the answer position reads the name ends
                        part, mass, n = relay_attention_loss(
                            model, relay_layer, cfg.size.text_heads - 1, hidden[relay_layer - 1],
                            text.get("position_ids"), rows, pos, sources)
                        seek_loss, seek_n = seek_loss + part * n, seek_n + n
                        seek_mass["on-names"] = mass
                    if cfg.fetch_neighbour_layer:  # leftof: from the named object to its left neighbour
                        part, mass, n = fetch_attention_loss(
                            model, cfg.fetch_neighbour_layer, cfg.size.text_heads - 1,
                            hidden[cfg.fetch_neighbour_layer - 1], text["input_ids"], text.get("position_ids"), rows,
                            pos, cover[:, 2], patch_index)
                        seek_loss, seek_n = seek_loss + part * n, seek_n + n
                        seek_mass["on-neighbour"] = mass
                    seek_loss = seek_loss / max(seek_n, 1)  # the mean over every target (both objects' and the relay's)
                    if world > 1:  # as the answer loss: the mean gradient over processes is the whole batch's
                        seek_loss = seek_loss * (seek_n * world / max(parallel.total(seek_n), 1.0))
                    loss = loss + cfg.fetch_attention_weight * seek_loss
                if dense_loss is not None:  # every process has the same number of scenes: the plain mean is right
                    loss = loss + cfg.tower_dense_weight * dense_loss
            opt_b.zero_grad(set_to_none=True)
            opt_tower.zero_grad(set_to_none=True)
            opt_tower_share.zero_grad(set_to_none=True)
            opt_xy.zero_grad(set_to_none=True)
            opt_readout.zero_grad(set_to_none=True)
            opt_counter.zero_grad(set_to_none=True)
            loss.backward()
            parallel.average_gradients(b_params + (list(token_xy.parameters()) if cfg.token_xy_weight > 0 else [])
                                       + (list(readout.parameters()) if fetching else [])
                                       + (list(counter.parameters()) if counting else []))
            if tuning:
                parallel.average_gradients(tower_params)
                torch.nn.utils.clip_grad_norm_(model.model.vision_tower.parameters(), 1.0)
                opt_tower.step()
                if cfg.tower_share_weight > 0 or cfg.tower_place_weight > 0:
                    opt_tower_share.step()
            torch.nn.utils.clip_grad_norm_(b_params, 1.0)
            opt_b.step()
            if cfg.token_xy_weight > 0:
                opt_xy.step()
            if fetching:
                opt_readout.step()
            if counting:
                opt_counter.step()
            if ema is not None:
                ema.update()
            st["step"] += 1
            st["wall"] += time.time() - t0
            info = f"loss {loss.item():.3f} answer-acc {acc:.2f}" + (f" keep {keep}" if short else "")
            if cfg.token_xy_weight > 0:
                info += f" token-xy {xy_loss.item():.4f}"
            if fetching:
                info += f" fetch {fetch_loss.item():.4f} named-cells {fetch_cells:.2f}"
                if cfg.fetch_second:
                    info += f" second-cells {second_cells:.2f}"
            if counting:
                info += f" share {share_loss.item():.4f} count {count_loss.item():.4f} implied-count-err {implied:.2f}"
            if attending:
                info += f" count-attention {attention_loss.item():.3f} on-target {attention_mass:.2f}"
            if seeking:
                info += f" fetch-attention {seek_loss.item():.3f} " + " ".join(
                    f"{k} {v:.2f}" for k, v in seek_mass.items())
            if dense_loss is not None:
                info += f" dense {dense_loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in dense_stats.items())
            if bar:
                bar.update(task, completed=st["step"], info=info)
            if st["step"] % 25 == 0:
                st["history"].append({"stage": "B", "step": st["step"], "wall": round(st["wall"], 1),
                                      "loss": round(loss.item(), 4), "answer_acc": round(acc, 4),
                                      "lr": round(cfg.lr_b * lr_factor, 8)})
                log(f"B {st['step']} {st['wall']:.0f}s {info}")
            over_time = cfg.time_limit_b > 0 and st["wall"] - b_start_wall > cfg.time_limit_b
            (over_time,) = parallel.broadcast_flags(over_time)  # rank 0's clock decides for every process
            if rank == 0 and (st["step"] % cfg.eval_every == 0 or st["step"] == cfg.steps_b or over_time):
                res = evaluate(model, processor, eval_set, batch_size=16, answers=ds.answers)
                model.train()
                model.model.vision_tower.train(tuning)
                rec = {"stage": "B-eval", "step": st["step"], "wall": round(st["wall"], 1),
                       "accuracy": round(res["accuracy"], 4),
                       "per_type": {k: round(v, 4) for k, v in res["per_type"].items()}}
                st["history"].append(rec)
                log(json.dumps(rec))
                key = (min(res["per_type"].values()), res["accuracy"])
                if st["best"] is None or key >= tuple(st["best"]["key"]):
                    st["best"] = {"key": list(key), "step": st["step"], **rec}
                    if not cfg.export_final:
                        export(model, processor, out / "model")
                        log(f"exported best model at step {st['step']}")
                if key[0] >= cfg.target_min_type:
                    log("target reached on the eval set; stopping Stage B")
                    st["stage"], st["target_reached"] = "done", True
            if world > 1 and st["step"] % cfg.eval_every == 0:
                (reached,) = parallel.broadcast_flags(st.get("target_reached", False))
                if reached:
                    st["stage"], st["target_reached"] = "done", True
            if st["step"] % cfg.save_every == 0 or st["stage"] == "done" or over_time:
                save()
            if over_time:
                log("Stage B time limit reached")
                st["time_up"] = True
                break
    st["stage"] = "done" if st["step"] >= cfg.steps_b or (cfg.export_final and st.get("time_up")) else st["stage"]
    if cfg.export_final and st["stage"] == "done" and rank == 0 and not st.get("final_exported"):
        export(model, processor, out / "model")
        if ema is not None:
            export(ema.averaged_model(), processor, out / "model_ema")
            log(f"exported the weight average (decay {cfg.ema_decay}) to {out / 'model_ema'}")
        st["final_exported"] = True
        log(f"exported the final model at step {st['step']}")
    save()
    if rank != 0:  # Stage C and the summary belong to rank 0 (the other processes' weights are the same)
        return model
    if (st["stage"] == "done" and cfg.cls_steps > 0 and not cfg.cls_before_b and not st.get("cls_done")
            and (out / "model").exists()):
        # ---- Stage C: the exported best model's [CLS] embedding (cls_saliency.py) ----
        from .builtin import resolve_model

        best, _ = resolve_model(out / "model")
        stage_c(best.to(device), "")
        export(best, processor, out / "model")
        save()
    summary = {"config": cfg.to_dict(), "history": st["history"], "best": st["best"],
               "train_wall_s": round(st["wall"], 1), "machine": machine(),
               "data_version": ds.version, "eval_majority": majority_baseline(eval_set),
               "question_types": list(ds.question_types)}
    (out / "train_summary.json").write_text(cpt.dumps_strict(summary, indent=2))
    return model


def export_latest(run: str | Path, out: str | Path) -> tuple[int, str]:
    """Write the newest training state of the run in `run` (its `state/` checkpoint, at whatever step, not the best
    watched model that `run/model` holds) as a model directory `out` (must not exist; written atomically).
    -> (the state's step, its stage)."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists (give a new directory)")
    config = run / "train_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{run} is not a training run (no train_config.json)")
    raw = json.loads(config.read_text())
    folder = cpt.latest(run / "state", "train it first")
    if folder is None:
        raise cpt.CheckpointError(f"{run / 'state'} holds no training state")
    ds = get_dataset(raw["data"])
    model = ds.build_model(ModelSize(**raw["size"]), int(raw["seed"]))
    saved = cpt.load_state(folder, "state", "cpu")
    model.load_state_dict(saved["model"])
    export_atomic(model, ds.build_processor(), out)
    return int(saved["st"]["step"]), str(saved["st"]["stage"])


def export_atomic(model, processor, directory: str | Path, dtype: torch.dtype = torch.float16,
                  replace: bool = False) -> None:
    """`export` into a temporary sibling, then renamed: `directory` appears complete or not at all. An existing
    `directory` is replaced (`replace`, e.g. an interrupted earlier attempt) or refused (FileExistsError)."""
    import shutil
    import tempfile

    directory = Path(directory)
    if directory.exists() and not replace:
        raise FileExistsError(f"{directory} already exists (give a new directory)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        export(model, processor, tmp, dtype)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(model, processor, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """save_pretrained model (safetensors, `dtype`) and processor into one directory. The tokenizer is saved
    without a padding state (every call sets its own; an earlier `padding=True` call would otherwise be
    written into tokenizer.json)."""
    import copy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(dtype)
    for sub in (m.config.text_config, m.config.vision_config):  # a loaded model's sub-configs name their dtype
        if getattr(sub, "dtype", None) is not None:
            sub.dtype = dtype
    m.save_pretrained(directory, safe_serialization=True)
    processor.tokenizer.backend_tokenizer.no_padding()
    processor.save_pretrained(directory)


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 autocast speeds training up on `device`: always on CUDA; on a CPU only with native bf16
    instructions (AVX512-BF16 or AMX). Without them bf16 is emulated: on an AVX-512 Xeon without either, a
    32 x 64 decoder step took 2.8x longer under bf16 autocast than in fp32 (docs/testbed.md)."""
    if not device.startswith("cpu"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine() -> str:
    """Short description of where training ran."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
           f"threads {torch.get_num_threads()}"
