"""The v3 training chain as one resumable command: the recipe that reached 0.88 in the ninth session, in four phases.

    vtprune testbed chain --out DIR            # re-run the same command after any interruption: it resumes

1. `small` — `--preset v3` with a 4 × 64 decoder (the k-runs of the fifth to eighth sessions: half the Stage-B step
   cost of 32 layers): Stage A (tower), probe projector init, Stage B (single-question steps, packed questions, the
   type curriculum then `SMALL_TYPES`, the answer-position read-out after layer 2, the count attention target of
   `count_attention.py` on layer 3), hand-over of its final state;
2. `tower` — Stage B again from that model with the vision tower trained end to end (the ninth session's t3:
   decoder and tower lr 3e-4, Stage A's dense loss and the object-share regression on the tower, every scored type
   with leftof / count / number / relation weighted twice, `upper` three times);
3. `grown` — the decoder grown to 32 layers computing the same function (`grow.grow_decoder`);
4. `deep` — Stage C (the [CLS] embedding, `cls_saliency.py`), then a brief Stage B at 32 layers (lr 3e-4, the
   read-out after layer 16, the tower frozen), in which the decoder adapts to the patch features Stage C shifted.

Every phase's learning rate anneals by its time limit as well as by its step count (`TrainConfig.anneal_by_time`).

`--vision-init DIR` takes the tower of an earlier Stage A instead of running one (the committed work-in-progress
checkpoint `benchmarks/checkpoints/shapes-v3-wip` holds 2,400 Stage-A steps: about 45 minutes saved). Each phase
writes `DIR/<phase>/` (its own resumable trainer state) and `DIR/<phase>/PHASE_DONE` when finished; the
last phase's model is `DIR/deep/model` (a stock `LlavaForConditionalGeneration`). Time limits (`PHASE_SECONDS`,
scaled by `time_scale`) are set so that the chain takes about 3 h on one CPU thread (docs/testbed.md, "tenth
session" to "twelfth session", state what it reached: 0.64, then 0.69 with `SMALL_TYPES` and the digits in the
read-out, then 0.74 with the count attention target, at `--time-scale` 0.6 / 0.75 / 0.75); each phase's Stage B
ends at its limit and hands over its final state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .train import TrainConfig, export_atomic, train
from .train_v3 import V3_TRAINING_TYPES, v3_config

#: every scored type, the hard ones twice, `upper` three times (ninth session's t3, from k12's list)
TOWER_TYPES = ("20000:colour+shape+exist+leftof+leftof+count+count+number+number+relation+relation+side"
               "+upper+upper+upper")
#: the small phase's types: the preset's look-ups first, then k9's weighted list (eighth session: 0.80; number and
#: count three times, relation three times, leftof and side twice): with number once among the types, chain1's small
#: phase never started reading numbers (tenth session); exist twice: once in 17, chain2's small phase left it at its
#: prior (eleventh session)
SMALL_TYPES = ("600:colour+shape,1800:colour+shape+exist,20000:colour+shape+exist+exist+leftof+leftof+count+count"
               "+count+number+number+number+relation+relation+relation+side+side+upper")
#: the decoder layer (1-based) whose head 0 learns the count attention target (`count_attention.py`) in the 4-layer
#: phases; growth ("spread") moves trained layer s to s * 32 / 4, so the deep phase's is its image
COUNT_ATTENTION_LAYER = 3
#: Stage-B seconds per phase on one CPU thread (Stage A, the feature cache and the evaluations come on top)
PHASE_SECONDS = {"small": 3600.0, "tower": 2400.0, "deep": 1200.0}
SMALL_LAYERS, DEEP_LAYERS = 4, 32


@dataclass(frozen=True)
class Phase:
    """One link: a training run into `DIR/name` (config from the previous link's model), or a growth."""

    name: str
    config: Callable[[str], TrainConfig] | None = None  # previous model dir ("" for the first) -> config
    grow_to: int = 0  # > 0: no training, the previous model's decoder grown to this many layers


def phases(seed: int = 0, time_scale: float = 1.0, tiny: bool = False, vision_init: str = "") -> list[Phase]:
    """The chain's four links (tiny: the smoke-test size and a few steps each, seconds in all). vision_init: a model
    whose vision tower replaces Stage A (e.g. benchmarks/checkpoints/shapes-v3-wip: 2,400 Stage-A steps)."""
    base = replace(v3_config(seed=seed), anneal_by_time=True)  # every phase ends at its time limit, annealed
    small_layers, deep_layers = SMALL_LAYERS, DEEP_LAYERS
    if tiny:
        from .train_v3 import TINY_V3

        base = replace(base, size=TINY_V3, steps_a=2, batch_a=2, probe_scenes=8, steps_b=3, single_steps=1,
                       single_batch=2, batch_b=2, questions_per_image=2, feature_cache=4, eval_every=2,
                       eval_per_type=1, cls_steps=1, head_fit_steps=1, keep_schedule="1:16,2:96")  # fmt: skip
        small_layers, deep_layers = 1, 2

    def _count_layer(layers: int) -> int:
        """COUNT_ATTENTION_LAYER of the small decoder, where growth to `layers` layers puts it (1-based)."""
        source = min(COUNT_ATTENTION_LAYER, small_layers)
        return (source - 1) * layers // small_layers + 1

    def limit(name: str) -> float:
        return 0.0 if tiny else PHASE_SECONDS[name] * time_scale

    def steps(n: int) -> int:
        return base.steps_b if tiny else n

    def small(_: str) -> TrainConfig:
        return replace(base, size=replace(base.size, text_layers=small_layers), fetch_layer=max(1, small_layers // 2),
                       type_schedule=SMALL_TYPES, time_limit_b=limit("small"), export_final=True, cls_steps=0,
                       count_attention_weight=1.0, count_attention_layer=_count_layer(small_layers),
                       vision_init=vision_init, steps_a=0 if vision_init else base.steps_a)  # fmt: skip

    def continuation(init: str, layers: int) -> TrainConfig:
        """A Stage B continuing `init`: no Stage A, the trained projector and position codes kept, every type."""
        return replace(base, size=replace(base.size, text_layers=layers), init=init, steps_a=0, single_steps=0,
                       keep_schedule="", column_code_scale=0.0, row_code_scale=0.0, lr_b=3e-4,
                       type_schedule=TOWER_TYPES, training_types=V3_TRAINING_TYPES, export_final=True,
                       fetch_layer=max(1, layers // 2), feature_cache=0, count_attention_weight=1.0,
                       count_attention_layer=_count_layer(layers))  # fmt: skip

    def tower(init: str) -> TrainConfig:
        return replace(continuation(init, small_layers), steps_b=steps(3000), time_limit_b=limit("tower"),
                       tower_lr_b=3e-4, tower_share_weight=1.0, eval_every=steps(500), cls_steps=0)  # fmt: skip

    def deep(init: str) -> TrainConfig:
        return replace(continuation(init, deep_layers), steps_b=steps(800), time_limit_b=limit("deep"),
                       eval_every=steps(200), cls_before_b=True)  # fmt: skip

    return [Phase("small", small), Phase("tower", tower), Phase("grown", grow_to=deep_layers), Phase("deep", deep)]


def run_chain(out: str | Path, *, seed: int = 0, time_scale: float = 1.0, tiny: bool = False, threads: int = 1,
              bf16: bool = False, device: str = "cpu", progress: bool = True, vision_init: str = "",
              log: Callable[[str], None] = print) -> Path:
    """Run (or resume) every phase into `out` (`phases` for the arguments); -> the final model directory
    (`out/deep/model`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = ""
    for phase in phases(seed, time_scale, tiny, vision_init):
        folder = out / phase.name
        done = folder / "PHASE_DONE"
        if done.exists():
            log(f"chain: {phase.name} done")
        elif phase.grow_to:
            _grow(Path(previous), folder, phase.grow_to)
        else:
            cfg = replace(phase.config(previous), threads=threads, bf16=bf16)
            log(f"chain: {phase.name} ({cfg.size.text_layers} decoder layers, Stage A {cfg.steps_a} steps, Stage B "
                f"up to {cfg.steps_b} steps / {cfg.time_limit_b:.0f} s)")  # fmt: skip
            train(folder, cfg, device=device, log=log, progress=progress)
            if not (folder / "model").exists():
                raise RuntimeError(f"chain: phase {phase.name} ended without a model in {folder / 'model'}")
        _mark_done(done)
        previous = str(folder if phase.grow_to else folder / "model")
    return Path(previous)


def _grow(source: Path, folder: Path, layers: int) -> None:
    """`folder` = the model at `source` with its decoder grown to `layers` layers (written atomically)."""
    from .builtin import resolve_model
    from .grow import grow_decoder

    model, processor = resolve_model(str(source))
    export_atomic(grow_decoder(model, layers, "spread"), processor, folder, replace=True)  # replaces an interrupted try


def _mark_done(done: Path) -> None:
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text("done\n")
    os.replace(tmp, done)
