"""Rounds of model soups as one resumable command: branches of one parent trained side by side, then their mean.

    vtprune testbed soup-rounds --init benchmarks/checkpoints/shapes-v3-soup2 --out DIR [--rounds 2] \
        [--branches 2] [--seconds 2400] [--seed 16] [--ema 0.999] [--cls-drift 50]   # re-run to resume

Round r (1-based) starts from its parent: the `--init` model for round 1, round r - 1's soup after that.
`branches` continuations of the parent (`branch_config`: the chain's tower phase with the changes of the
twenty-first to twenty-fourth sessions' runs u25-u33) are trained at the same time, one process with one CPU thread
each, in `DIR/round{r}/branch{b}` (training seed `seed + (r - 1) * branches + b`, so every branch reads other
train-split scenes); then `DIR/round{r}/soup` is the uniform mean of the weights of the parent and its branches
(`soup.soup_saved`, in the parent's dtype). On two cores two one-thread branches do 1.4x the work of one two-thread
run, and their soup counted better than any member (docs/testbed.md, "v3 training: twenty-fourth session": the
manual rounds this command repeats). `DIR/lineage.json` lists every branch and soup with its command, steps and
seconds, in the form of `benchmarks/lineage/*.json`.

Resumable: a finished branch has `BRANCH_DONE`, an interrupted one resumes from its own trainer state, a written
soup is kept; a resume with another `--lr` (or another `--cls-drift`) than the run's is refused. The last round's
soup is the result (`run_soup_rounds` returns its directory). With `--ema DECAY` each branch also keeps the moving
average of its weights (`TrainConfig.ema_decay`) and the soup takes those averages (twenty-fifth session: the soup
of two runs' averages counted 0.895 against 0.881 for the soup of their final weights, p = 0.035).

With `--cls-drift W` the rounds adapt the decoder to Stage C instead: first `DIR/cls` is the `--init` model with
its [CLS] embedding trained by Stage C (`stage_c_saved`: the chain's deep-phase settings, feature-drift penalty W),
the parent of round 1, and every branch trains the decoder alone (`branch_config(frozen_tower=True)`), so the tuned
[CLS] attention is kept and the decoder learns the patch features Stage C moved (twenty-sixth session: Stage C
after training cost a 4-layer model about a point of counting; one decoder-only run after it recovered part).
The result then needs no Stage C of its own when it is grown (`benchmarks/v3_deep_from.py --cls-steps 0`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..checkpointing import dumps_strict, write_text_atomic
from . import chain_v3
from .train import TrainConfig, machine, train

#: the branches' learning rate, decoder and tower alike (the chain's tower phase: 6e-4; nineteenth session's u15:
#: 3e-4 from a trained model kept what it had and added to it)
BRANCH_LR = 3e-4
#: how often count is asked in the branches' type list (the chain: twice; u15 onwards: four times)
BRANCH_COUNT_TIMES = 4
#: the tower's centre targets spread over this many pixels (`TrainConfig.centre_spread`, twenty-first session)
BRANCH_CENTRE_SPREAD = 7.0
#: Stage-B seconds per branch (the learning rate anneals by it): u28-u33 ran 2,400 s each, two at a time
BRANCH_SECONDS = 2400.0


def tower_types(count_times: int) -> str:
    """The chain's tower-phase type list (`chain_v3.TOWER_TYPES`) with count asked `count_times` times."""
    if count_times < 1:
        raise ValueError(f"count_times must be >= 1, got {count_times}")
    return chain_v3.TOWER_TYPES.replace("+count+count+", "+" + "+".join(["count"] * count_times) + "+", 1)


def branch_config(init: str, seed: int, seconds: float = BRANCH_SECONDS, tiny: bool = False,
                  ema_decay: float = 0.0, frozen_tower: bool = False, lr: float = BRANCH_LR) -> TrainConfig:
    """One branch: `init` (a 4-layer v3 model; the tiny chain's 2-layer one with `tiny`) continued by the chain's
    tower phase on one thread, fp32, with decoder and tower peak learning rate `lr` (default `BRANCH_LR`), the
    tower's centre count target spread over `BRANCH_CENTRE_SPREAD` pixels, count asked `BRANCH_COUNT_TIMES` times,
    Stage B ended (and annealed) at `seconds` (tiny: by its few steps), the final state exported (and with
    `ema_decay` > 0 the moving average of its weights, `TrainConfig.ema_decay`, as `model_ema`). frozen_tower: the
    vision tower (and its [CLS] embedding) is not trained, nor are the training-only losses that read its features
    while it trains; the decoder is."""
    tower = {p.name: p for p in chain_v3.phases(seed=seed, tiny=tiny)}["tower"]
    cfg = tower.config(init)
    cfg = replace(cfg, lr_b=lr, tower_lr_b=lr, type_schedule=tower_types(BRANCH_COUNT_TIMES),
                  time_limit_b=0.0 if tiny else float(seconds), threads=1, procs=1, bf16=False,
                  tower_count_target="centre", centre_spread=BRANCH_CENTRE_SPREAD, count_mark="centre",
                  count_attention_heads="", count_attention_weight=1.0, centre_sum_weight=0.0,
                  export_final=True, ema_decay=ema_decay)  # fmt: skip
    if frozen_tower:
        cfg = replace(cfg, tower_lr_b=0.0, tower_share_weight=0.0, tower_place_weight=0.0)
    return cfg


def stage_c_saved(source: str | Path, dest: str | Path, drift: float, tiny: bool = False,
                  log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """`dest` = the model at `source` with its [CLS] embedding trained by Stage C
    (`cls_saliency.tune_cls_embedding` with the chain's deep-phase steps, learning rate, scene and statistics seeds;
    feature-drift penalty `drift`), every other weight untouched, saved atomically in `source`'s dtype (an existing
    `dest` is replaced with `overwrite`, else refused). -> Stage C's statistics ("before", "after", "steps", "lr",
    "wall_s") and "machine" (`train.machine()`, one thread)."""
    import torch

    from .builtin import resolve_model
    from .cls_saliency import tune_cls_embedding
    from .data_v3 import dense_batch
    from .soup import stored_dtype
    from .train import export_atomic

    deep = {p.name: p for p in chain_v3.phases(tiny=tiny)}["deep"].config(str(source))
    dtype = stored_dtype(source)  # tuned and scored as it will be saved
    model, processor = resolve_model(source, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as the branches (and the lineage says)
    try:
        stats = tune_cls_embedding(model, deep.cls_steps, deep.cls_lr, seed=deep.seed + 3, eval_seed=deep.eval_seed,
                                   log=log, dense=dense_batch, drift_weight=drift)
        stats["machine"] = machine()
    finally:
        torch.set_num_threads(threads)
    export_atomic(model, processor, dest, dtype=dtype, replace=overwrite)
    return stats


def _branch_worker(index: int, jobs: list[tuple[str, TrainConfig]]) -> None:
    """Spawned process `index`: train its branch, its log lines appended to `<branch>.log`."""
    folder, cfg = jobs[index]
    with open(f"{folder}.log", "a", encoding="utf-8") as log_file:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        train(folder, cfg, log=log, progress=False)
    write_text_atomic(Path(folder) / "BRANCH_DONE", "done\n")


def measured(folder: Path) -> dict:
    """A finished training run's steps (the last step each stage logged, its evaluations counted with it, summed
    over the stages: a branch has only Stage B), training seconds and machine, from its `train_summary.json`."""
    summary = json.loads((folder / "train_summary.json").read_text())
    last: dict[str, int] = {}
    for h in summary.get("history", []):
        stage = str(h.get("stage", "")).removesuffix("-eval")
        last[stage] = max(last.get(stage, 0), int(h.get("step", 0)))
    return {"steps": sum(last.values()), "seconds": round(float(summary.get("train_wall_s", 0.0)), 1),
            "machine": str(summary.get("machine", ""))}


def _decoder_layers(model_dir: Path) -> int | None:
    """The decoder depth in `model_dir/config.json` (None when it is not a Llava config)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        return int(config["text_config"]["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_soup_rounds(out: str | Path, init: str, *, rounds: int = 1, branches: int = 2,
                    seconds: float = BRANCH_SECONDS, seed: int = 0, ema_decay: float = 0.0, cls_drift: float = 0.0,
                    lr: float = BRANCH_LR, tiny: bool = False, log: Callable[[str], None] = print,
                    finished: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) `rounds` soup rounds from `init` into `out` (module docstring); -> the last soup's
    directory. ema_decay > 0: each branch also keeps the moving average of its weights, and the soup takes those
    averages (`branch/model_ema`) instead of the branches' final weights. cls_drift > 0: Stage C with that
    feature-drift penalty first (`out/cls`), then branches with a frozen tower. lr: the branches' peak learning
    rate. finished: called with each soup (and Stage C's model) this call writes. Raises ValueError for rounds or
    branches < 1, seconds <= 0 or lr <= 0, a decay outside [0, 1), a negative cls_drift, or an init that is not a
    directory."""
    if rounds < 1 or branches < 1:
        raise ValueError(f"rounds and branches must be >= 1, got rounds={rounds}, branches={branches}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (the branches' peak learning rate; default {BRANCH_LR:g}), got {lr}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {ema_decay}")
    if not cls_drift >= 0.0:
        raise ValueError(f"cls_drift must be >= 0 (0: no Stage C), got {cls_drift}")
    if not Path(init).is_dir():
        raise ValueError(f"init {init} is not a model directory (a 4-layer v3 model saved with save_pretrained)")
    want = 2 if tiny else chain_v3.SMALL_LAYERS
    layers = _decoder_layers(Path(init))
    if layers != want:
        raise ValueError(f"init {init} has {layers} decoder layers; soup rounds continue a {want}-layer v3 model (the "
                         f"chain's tower phase, e.g. benchmarks/checkpoints/shapes-v3-soup2), grown afterwards")
    import torch.multiprocessing as mp

    from .soup import soup_saved

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lineage: list[dict] = []
    parent = str(init)
    command = (f"vtprune testbed soup-rounds --init {init} --out {out} --rounds {rounds} --branches {branches} "
               f"--seconds {seconds:g} --seed {seed}" + (f" --ema {ema_decay:g}" if ema_decay else "")
               + (f" --cls-drift {cls_drift:g}" if cls_drift else "") + (f" --lr {lr:g}" if lr != BRANCH_LR else ""))
    if cls_drift:
        tuned, record = out / "cls", out / "cls_stage_c.json"
        if tuned.is_dir() and record.is_file():
            log("soup-rounds: Stage C done")
            stats = json.loads(record.read_text())
            if stats.get("drift", cls_drift) != cls_drift:
                raise ValueError(f"{tuned} was made with feature-drift penalty {stats['drift']:g}, not {cls_drift:g}: "
                                 f"resume with the same command or give a new --out")
        else:
            log(f"soup-rounds: Stage C on {init} (feature-drift penalty {cls_drift:g})")
            stats = {**stage_c_saved(init, tuned, cls_drift, tiny, log=log, overwrite=True), "drift": cls_drift}
            write_text_atomic(record, dumps_strict(stats, indent=1) + "\n")
            if finished:
                finished(str(tuned))
        lineage.append({"run": str(tuned), "what": f"Stage C on {init}: the [CLS] embedding alone, feature-drift "
                                                   f"penalty {cls_drift:g} ([CLS] mass on informative patches "
                                                   f"{stats['before']['mass']} -> {stats['after']['mass']})",
                        "command": command, "steps": int(stats["steps"]), "seconds": float(stats["wall_s"]),
                        "threads": 1, "machine": stats["machine"]})  # fmt: skip
        parent = str(tuned)
    for r in range(1, rounds + 1):
        folder = out / f"round{r}"
        folder.mkdir(exist_ok=True)
        jobs = []
        for b in range(branches):
            branch = folder / f"branch{b}"
            cfg = branch_config(parent, seed + (r - 1) * branches + b, seconds, tiny, ema_decay,
                                frozen_tower=cls_drift > 0, lr=lr)
            what = "continuation of the decoder alone" if cls_drift else "continuation"
            lineage.append({"run": str(branch), "what": f"round {r}: {what} of {parent} (seed {cfg.seed}, peak "
                                                        f"learning rate {lr:g}), "
                                                        f"one of {branches} branches trained side by side",
                            "command": command, "threads": 1})  # fmt: skip
            saved = branch / "train_config.json"
            trained_lr = json.loads(saved.read_text()).get("lr_b", cfg.lr_b) if saved.is_file() else cfg.lr_b
            if trained_lr != cfg.lr_b:
                raise ValueError(f"{branch} was trained with peak learning rate {trained_lr:g}, not {cfg.lr_b:g}: "
                                 f"resume with the same command or give a new --out")
            if (branch / "BRANCH_DONE").exists():
                log(f"soup-rounds: round {r} branch {b} done")
            else:
                jobs.append((str(branch), cfg))
        if jobs:
            log(f"soup-rounds: round {r}: training {len(jobs)} branch(es) from {parent}, one thread each")
            mp.spawn(_branch_worker, args=(jobs,), nprocs=len(jobs), join=True)
        member = "model_ema" if ema_decay else "model"
        for entry in lineage[-branches:]:
            entry.update(measured(Path(entry["run"])))
        soup = folder / "soup"
        if soup.is_dir():  # its branches' weights may be gone (a recipe pack keeps only the soup)
            log(f"soup-rounds: round {r} soup done")
        else:
            for b in range(branches):
                if not (folder / f"branch{b}" / member).is_dir():
                    raise RuntimeError(f"soup-rounds: round {r} branch {b} ended without {member}")
            soup_saved([parent] + [str(folder / f"branch{b}" / member) for b in range(branches)], soup)
            log(f"soup-rounds: round {r}: soup of {parent} and {branches} branch(es) in {soup}")
            if finished:
                finished(str(soup))
        lineage.append({"run": str(soup), "what": f"round {r}: the uniform mean of the weights of {parent} and its "
                                                  f"{branches} branches' {member}, in the parent's dtype",
                        "command": lineage[-1]["command"], "steps": 0, "seconds": 0, "threads": 1,
                        "machine": lineage[-1]["machine"]})  # fmt: skip
        write_text_atomic(out / "lineage.json", dumps_strict(lineage, indent=1) + "\n")
        parent = str(soup)
    return Path(parent)
