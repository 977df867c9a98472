"""The path that reached issue 21's accuracy bar, as one resumable command (the lineage of `shapes-v3-soup6`,
36 runs of six scripts, condensed).

    vtprune testbed recipe --out DIR [--pack PACK] [--vision-init benchmarks/checkpoints/shapes-v3-wip] # re-run: resume

1. `DIR/chain`: `vtprune testbed chain`'s first two phases (`small`, `tower`; `chain_v3.run_chain(until="tower")`),
   two threads: a 4-layer v3 model, about 0.88 (about 2.5 h with Stage A, 2 h with `--vision-init`);
2. `DIR/rounds`: `rounds` soup rounds from it (`soup_rounds.run_soup_rounds`, the branches' configuration of
   u15-u33, moving averages of the weights): the lineage's six sequential continuations and six rounds after the
   chain's tower, run as two branches side by side (about 45 min a round with `seconds` = 2,400);
3. `DIR/cls-rounds`: Stage C with feature-drift penalty `CLS_DRIFT`, then `cls_rounds` rounds training the decoder
   alone at peak learning rate `CLS_LR` (the lineage's rounds 7 and 9, twenty-sixth and twenty-eighth sessions);
4. `DIR/final`: the result grown to 32 layers computing the same function (placement "spread_next", no second
   Stage C: the preview's `benchmarks/v3_deep_from.py ... --cls-steps 0`); `DIR/final/model` is the model and
   `DIR/final` the run directory the model card reads (`python -m vtprune.testbed.card DIR/final --lineage
   DIR/lineage.json ...`).

`DIR/recipe.json` records the arguments (a resume with others is refused); `DIR/lineage.json` lists every run
with its command, steps, seconds, threads and machine (`card.check_lineage`). About 14 h on the 2-core machine with
the defaults (the thirty-first to thirty-fourth sessions' phases on a 2-vCPU AMD EPYC: about 3.5 h of chain, 42 min
a round; not yet run end to end): far from issue 21's 3 hours, which no recipe found so far meets on two CPU cores.
Every phase's length is a wall-clock limit (as in the lineage), so a loaded machine trains less: run it alone.

A resume needs `DIR`; with `--pack PACK` the finished phases' records and the models later phases read are also
kept in the small folder PACK after each phase (`recipe_pack`), and a run whose `DIR` is missing (another machine)
starts from PACK's phases: commit PACK to carry the run across machines that do not keep their disks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..checkpointing import dumps_strict, read_json, write_text_atomic
from . import chain_v3
from .grow import grow_saved
from .recipe_pack import MANIFEST, restore_pack, write_pack
from .soup_rounds import BRANCH_SECONDS, measured, run_soup_rounds
from .train import train

#: soup rounds with the tower trained (the lineage after the chain's tower: six sequential continuations, then six
#: rounds; two branches a round do at least a sequential continuation's work in the same wall time)
ROUNDS = 12
#: decoder-only rounds after Stage C (the lineage: rounds 7 and 9; round 8 failed its rule and was not kept)
CLS_ROUNDS = 2
#: Stage C's feature-drift penalty before the decoder-only rounds (twenty-sixth session's choice)
CLS_DRIFT = 50.0
#: the decoder-only rounds' peak learning rate (twenty-eighth session's round 9)
CLS_LR = 1e-4
#: the branches' moving average of the weights, which the soups take (twenty-fifth session)
EMA_DECAY = 0.999
#: the decoder depth of the result and the placement of the trained layers (the preview's)
PLACEMENT = "spread_next"
#: seed offsets of the two round stages, so no branch re-reads the chain's or the other stage's scenes
ROUNDS_SEED, CLS_ROUNDS_SEED = 100, 200


def check_request(rounds: int, cls_rounds: int, branches: int, seconds: float) -> None:
    """Raise ValueError (one line, what is accepted) before anything is trained."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (soup rounds after the chain's tower phase; default {ROUNDS}), "
                         f"got {rounds}")
    if cls_rounds < 0:
        raise ValueError(f"cls_rounds must be >= 0 (0: no Stage C and no decoder-only rounds; default {CLS_ROUNDS}), "
                         f"got {cls_rounds}")
    if branches < 1:
        raise ValueError(f"branches must be >= 1 (one process and CPU core each; default 2), got {branches}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0 (Stage-B seconds per branch; default {BRANCH_SECONDS:g}), "
                         f"got {seconds}")


def phase_entry(folder: Path, what: str, command: str, threads: int) -> dict:
    """A lineage entry for the finished training run in `folder` (`soup_rounds.measured`: steps, seconds, machine)."""
    return {"run": str(folder), "what": what, "command": command, "threads": threads, **measured(folder)}


def run_recipe(out: str | Path, *, seed: int = 0, rounds: int = ROUNDS, cls_rounds: int = CLS_ROUNDS,
               branches: int = 2, seconds: float = BRANCH_SECONDS, vision_init: str = "", threads: int = 2,
               tiny: bool = False, progress: bool = True, pack: str | Path = "",
               log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the recipe into `out` (module docstring); -> the final run directory (`out/final`, the
    model in `out/final/model`). tiny: the smoke-test sizes (the tiny chain, a few steps per branch). pack: a folder
    kept up to date with the finished phases (`recipe_pack`) after each one; when `out` holds no recipe yet and the
    pack exists, the run starts from the pack's phases (another machine's progress)."""
    check_request(rounds, cls_rounds, branches, seconds)
    out = Path(out)
    request = {"seed": seed, "rounds": rounds, "cls_rounds": cls_rounds, "branches": branches, "seconds": seconds,
               "vision_init": vision_init, "tiny": tiny}
    recorded = out / "recipe.json"
    if pack and not recorded.is_file() and (Path(pack) / MANIFEST).is_file():
        def same_arguments(theirs: object) -> None:
            changed = _changed(theirs, request)
            if changed:
                raise ValueError(f"the pack {pack} is of a recipe run with other arguments: {changed}; give its "
                                 f"arguments or another --pack")
        n = restore_pack(pack, out, check_recipe=same_arguments)
        log(f"recipe: {n} files of finished phases restored from the pack {pack}")
    if recorded.is_file():
        changed = _changed(read_json(recorded), request)
        if changed:
            raise ValueError(f"{out} was started with other arguments: {changed}; resume with the same command or "
                             f"give a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(recorded, dumps_strict(request, indent=1) + "\n")
    command = (f"vtprune testbed recipe --out {out} --seed {seed} --rounds {rounds} --cls-rounds {cls_rounds} "
               f"--branches {branches} --seconds {seconds:g}"
               + (f" --vision-init {vision_init}" if vision_init else "") + (" --tiny" if tiny else ""))

    def refresh(_finished: str = "") -> None:
        if pack:
            log(f"recipe: pack {pack} refreshed ({write_pack(out, pack)} files)")

    refresh()  # before any training: a pack ahead of `out`, or of another run, is refused here
    chain_dir = out / "chain"
    tower = chain_v3.run_chain(chain_dir, seed=seed, tiny=tiny, threads=threads, vision_init=vision_init,
                               progress=progress, until="tower", log=log, finished=refresh)  # fp32
    lineage = [phase_entry(chain_dir / name, f"the chain's {name} phase (chain_v3.phases)", command, threads)
               for name in ("small", "tower")]

    parent = run_soup_rounds(out / "rounds", str(tower), rounds=rounds, branches=branches, seconds=seconds,
                             seed=seed + ROUNDS_SEED, ema_decay=EMA_DECAY, tiny=tiny, log=log, finished=refresh)
    lineage += _stage_lineage(out / "rounds", command)
    if cls_rounds:
        parent = run_soup_rounds(out / "cls-rounds", str(parent), rounds=cls_rounds, branches=branches,
                                 seconds=seconds, seed=seed + CLS_ROUNDS_SEED, ema_decay=EMA_DECAY,
                                 cls_drift=CLS_DRIFT, lr=CLS_LR, tiny=tiny, log=log, finished=refresh)
        lineage += _stage_lineage(out / "cls-rounds", command)

    final = out / "final"
    grown = out / "grown"
    deep = {p.name: p for p in chain_v3.phases(tiny=tiny)}
    layers = deep["grown"].grow_to  # 32 (the tiny chain: 4)
    if not (final / "model" / "config.json").exists():
        t0 = time.time()
        grow_saved(parent, grown, layers, PLACEMENT, replace=True)  # replaces an interrupted try
        grow_s = time.time() - t0
        write_text_atomic(out / "grow_seconds.txt", f"{grow_s:.1f}\n")
        # no training: the run directory the card reads (its summary names the machine), the grown model exported
        cfg = replace(deep["deep"].config(str(grown)), steps_b=0, cls_steps=0, threads=1, bf16=False)
        train(final, cfg, log=log, progress=False)
    else:
        log("recipe: final done")
        grow_s = float((out / "grow_seconds.txt").read_text())
    entry = phase_entry(final, f"{parent} grown to {layers} layers computing the same function (placement {PLACEMENT}, "
                               f"no second Stage C)", command, 1)
    lineage.append({**entry, "steps": 0, "seconds": round(grow_s, 1)})
    write_text_atomic(out / "lineage.json", dumps_strict(lineage, indent=1) + "\n")
    refresh()
    return final


def _changed(started: object, request: dict) -> str:
    """The arguments of `request` that differ from a run's recorded ones (its `recipe.json`, read strictly), as
    "name old (now new), ..." ("" if none); a file that is not an object differs in every argument."""
    started = started if isinstance(started, dict) else {}
    return ", ".join(f"{k} {started.get(k)!r} (now {v!r})" for k, v in request.items() if started.get(k) != v)


def _stage_lineage(folder: Path, command: str) -> list[dict]:
    """A round stage's `lineage.json`, each entry's command prefixed with the recipe's."""
    entries = json.loads((folder / "lineage.json").read_text())
    return [{**e, "command": f"{command} (its step: {e['command']})"} for e in entries]
