"""The v3 training chain as one resumable command: the recipe that reached 0.88 in the ninth session, in four phases.

    vtprune testbed chain --out DIR            # re-run the same command after any interruption: it resumes

1. `small` — `--preset v3` with a 4 × 64 decoder (the k-runs of the fifth to eighth sessions: half the Stage-B step
   cost of 32 layers): Stage A (tower), probe projector init, Stage B (single-question steps, packed questions, the
   type curriculum then `SMALL_TYPES`, the answer-position read-out after layer 3, the attention targets: counting
   on layer 3, each named object fetched at its name in layer 2 and relayed to the answer position in layer 3),
   hand-over of its final state;
2. `tower` — Stage B again from that model with the vision tower trained end to end (the ninth session's t3;
   decoder and tower lr 6e-4 since the seventeenth session, Stage A's dense loss and the object-share regression on
   the tower, every scored type with leftof / count / number / relation weighted twice, `upper` three times);
3. `grown` — the decoder grown to 32 layers computing the same function (`grow.grow_decoder`);
4. `deep` — Stage C (the [CLS] embedding, `cls_saliency.py`, with a penalty on the features' drift), then a brief
   Stage B at 32 layers (lr 3e-4, the read-out after layer 24 and the attention targets on the grown images of their
   layers: 9 and 17, the tower frozen), in which the decoder adapts to the patch features Stage C shifted.

Every phase's learning rate anneals by its time limit as well as by its step count (`TrainConfig.anneal_by_time`).

`--vision-init DIR` takes the tower of an earlier Stage A instead of running one (the committed work-in-progress
checkpoint `benchmarks/checkpoints/shapes-v3-wip` holds 2,400 Stage-A steps: about 45 minutes saved on one thread, 35 on
two). Each phase writes `DIR/<phase>/` (its own resumable trainer state) and `DIR/<phase>/PHASE_DONE` when finished; the
last phase's model is `DIR/deep/model` (a stock `LlavaForConditionalGeneration`). Time limits (`PHASE_SECONDS`, scaled
by `time_scale`) are set so that the chain, Stage A included, takes about 3 h on the 2-core machine with `--threads 2`
(the default since the seventeenth session; until then 3 h on one thread, with a third less Stage-B work);
docs/testbed.md, "tenth session" onwards, states what each version reached. Each phase's Stage B ends at its limit and
hands over its final state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpointing import write_text_atomic
from .grow import grow_saved
from .train import TrainConfig, train
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
#: the decoder layers (1-based, of the 4-layer phases) of the training-only attention targets; growth ("spread")
#: moves trained layer s to (s - 1) * 32 / 4 + 1, so the deep phase's are their images (`layer_image`):
#: head 0 of COUNT_ATTENTION_LAYER learns the count target (`count_attention.py`); head 0 of FETCH_ATTENTION_LAYER
#: fetches each named object at the last word of its name, and the last head of FETCH_RELAY_LAYER gathers those
#: name ends at the answer position (`fetch_attention.py`, `fetch_attention_at="name"`; fifteenth session:
#: relations 0.77 -> 0.93 in the small phase); the answer-position read-out (`answer_readout.py`) comes after
#: READOUT_LAYER, where the named object has been relayed
COUNT_ATTENTION_LAYER = 3
FETCH_ATTENTION_LAYER, FETCH_RELAY_LAYER, READOUT_LAYER = 2, 3, 3
#: the count target's weight on `<s>` relative to each counted centre (`count_attention.py`): 4 / (4 + k) steps
#: 0.026 between k = 8 and 9 where 1 / (1 + k) steps 0.011 (fifteenth session's nm3, the best of its small phases)
COUNT_SINK_WEIGHT = 4.0
#: Stage-B seconds per phase with two CPU threads (`--threads 2`, the chain's default; Stage A, the feature cache,
#: the evaluations, growth and Stage C come on top, about 50 min there). Seventeenth session: the tower phase is where
#: the chain gains (chain5's 2,400 s tower phase continued for 3,000 s more: 0.84 -> 0.88, p = 0.0008), so it gets
#: the most time; two threads run a Stage-B step 1.4-1.7x faster than one on the 2-core Xeon
PHASE_SECONDS = {"small": 2400.0, "tower": 4500.0, "deep": 900.0}
#: Stage-B step caps of the tower and deep phases (their time limits end them first on 2 CPU cores)
TOWER_STEPS, DEEP_STEPS = 6000, 800
#: the tower phase's learning rate, decoder and tower alike (seventeenth session: 6e-4 against 3e-4 from the same
#: start, 2,000 steps each: 0.90 against 0.88 on 700 calibration questions, p = 0.009; the tower's alone doubled:
#: 0.89, p = 0.31)
TOWER_LR = 6e-4
SMALL_LAYERS, DEEP_LAYERS = 4, 32
#: the deep phase's Stage C penalises the patch features' drift (`TrainConfig.cls_drift_weight`). Twenty-first
#: session, on shapes-v3-u22 grown to 32 layers: Stage C alone moved the features by 3.8 % and cost counting 0.79 ->
#: 0.60 (0.81 -> 0.72 on a second set), which the deep Stage B did not recover (0.67 / 0.73); with this weight
#: the features move 1.0 %, the [CLS] mass on informative patches reaches 0.63 instead of 0.69 and counting stays
#: at 0.78 / 0.75 (overall 0.95 / 0.95, as the 4-layer model's)
CLS_DRIFT_WEIGHT = 20.0


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
        small_layers, deep_layers = 2, 4  # two layers: the name targets' relay needs a layer after the fetch

    def targets(layers: int) -> dict:
        """The attention targets and the read-out of a `layers`-deep decoder grown from the small one."""
        def source(layer: int) -> int:  # a layer of the 4-layer decoder, in the (tiny) small decoder
            return -(-layer * small_layers // SMALL_LAYERS)

        return dict(count_attention_weight=1.0, count_sink_weight=COUNT_SINK_WEIGHT,
                    count_attention_layer=layer_image(source(COUNT_ATTENTION_LAYER), small_layers, layers),
                    fetch_attention_weight=1.0, fetch_attention_at="name",
                    fetch_attention_layer=layer_image(source(FETCH_ATTENTION_LAYER), small_layers, layers),
                    fetch_relay_layer=layer_image(source(FETCH_RELAY_LAYER), small_layers, layers),
                    fetch_layer=source(READOUT_LAYER) * layers // small_layers)  # after the grown block's last layer

    def limit(name: str) -> float:
        return 0.0 if tiny else PHASE_SECONDS[name] * time_scale

    def steps(n: int) -> int:
        return base.steps_b if tiny else n

    def small(_: str) -> TrainConfig:
        return replace(base, size=replace(base.size, text_layers=small_layers), **targets(small_layers),
                       type_schedule=SMALL_TYPES, time_limit_b=limit("small"), export_final=True, cls_steps=0,
                       vision_init=vision_init, steps_a=0 if vision_init else base.steps_a)  # fmt: skip

    def continuation(init: str, layers: int) -> TrainConfig:
        """A Stage B continuing `init`: no Stage A, the trained projector and position codes kept, every type."""
        return replace(base, size=replace(base.size, text_layers=layers), init=init, steps_a=0, single_steps=0,
                       keep_schedule="", column_code_scale=0.0, row_code_scale=0.0, lr_b=3e-4,
                       type_schedule=TOWER_TYPES, training_types=V3_TRAINING_TYPES, export_final=True,
                       feature_cache=0, **targets(layers))  # fmt: skip

    def tower(init: str) -> TrainConfig:
        return replace(continuation(init, small_layers), steps_b=steps(TOWER_STEPS), time_limit_b=limit("tower"),
                       lr_b=TOWER_LR, tower_lr_b=TOWER_LR, tower_share_weight=1.0, eval_every=steps(500),
                       cls_steps=0)  # fmt: skip

    def deep(init: str) -> TrainConfig:
        return replace(continuation(init, deep_layers), steps_b=steps(DEEP_STEPS), time_limit_b=limit("deep"),
                       eval_every=steps(200), cls_before_b=True, cls_drift_weight=CLS_DRIFT_WEIGHT)  # fmt: skip

    return [Phase("small", small), Phase("tower", tower), Phase("grown", grow_to=deep_layers), Phase("deep", deep)]


def layer_image(layer: int, source_layers: int, layers: int) -> int:
    """Where growth ("spread", `grow.growth_plan`) from `source_layers` to `layers` puts trained layer `layer`
    (1-based both)."""
    return (layer - 1) * layers // source_layers + 1


def run_chain(out: str | Path, *, seed: int = 0, time_scale: float = 1.0, tiny: bool = False, threads: int = 2,
              bf16: bool = False, device: str = "cpu", progress: bool = True, vision_init: str = "",
              after: str = "", from_model: str = "", until: str = "", log: Callable[[str], None] = print,
              finished: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) every phase into `out` (`phases` for the arguments); -> the final model directory
    (`out/deep/model`). after / from_model: skip the phases up to and including `after` and hand `from_model` (what
    that phase would have produced, e.g. a 4-layer model continued outside the chain for after="tower") to the next.
    until: stop after that phase and return its model (e.g. "tower": the 4-layer model `recipe_v3` continues).
    finished: called with a phase's name each time this call finishes one (not for phases found done)."""
    chain = phases(seed, time_scale, tiny, vision_init)
    names = [phase.name for phase in chain]
    if bool(after) != bool(from_model):
        raise ValueError("after and from_model go together: the phase to start after and the model it hands over")
    if after and after not in names[:-1]:
        raise ValueError(f"after {after!r} is not a phase the chain can start after (accepted: "
                         f"{', '.join(names[:-1])})")
    if from_model and not Path(from_model).is_dir():
        raise ValueError(f"from_model {from_model} is not a model directory")
    if until and until not in names:
        raise ValueError(f"until {until!r} is not a phase of the chain (accepted: {', '.join(names)})")
    if until and after and names.index(until) <= names.index(after):
        raise ValueError(f"until {until!r} must come after {after!r}")
    if until:
        chain = chain[:names.index(until) + 1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = ""
    if after:
        chain = chain[names.index(after) + 1:]
        previous = str(from_model)
        log(f"chain: starting after {after} from {from_model}")
    for phase in chain:
        folder = out / phase.name
        done = folder / "PHASE_DONE"
        if done.exists():
            log(f"chain: {phase.name} done")
        elif phase.grow_to:
            grow_saved(previous, folder, phase.grow_to, replace=True)  # replaces an interrupted try
        else:
            cfg = replace(phase.config(previous), threads=threads, bf16=bf16)
            log(f"chain: {phase.name} ({cfg.size.text_layers} decoder layers, Stage A {cfg.steps_a} steps, Stage B "
                f"up to {cfg.steps_b} steps / {cfg.time_limit_b:.0f} s)")  # fmt: skip
            train(folder, cfg, device=device, log=log, progress=progress)
            if not (folder / "model").exists():
                raise RuntimeError(f"chain: phase {phase.name} ended without a model in {folder / 'model'}")
        if not done.exists():
            write_text_atomic(done, "done\n")
            if finished:
                finished(phase.name)
        previous = str(folder if phase.grow_to else folder / "model")
    return Path(previous)
