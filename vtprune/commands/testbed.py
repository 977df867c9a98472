"""`vtprune testbed ...`: export the benchmark, train the built-in model, score a model on it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `testbed` command (sub-commands export, train, chain, recipe, measure, grow, soup, soup-rounds,
    score) to a subparsers object whose parser class is `vtprune.cli.Parser`: its arguments are added when it is
    first used (their defaults import the testbed)."""
    from vtprune.commands.common import add_lazy_parser

    return add_lazy_parser(subparsers, "testbed", _arguments, help="built-in offline benchmark (shapes-llava)")


def _arguments(p: argparse.ArgumentParser) -> None:
    from vtprune.commands.common import positive_int
    from vtprune.testbed.data import HELDOUT_SEED

    sub = p.add_subparsers(dest="testbed_command", required=True)

    e = sub.add_parser("export", aliases=["generate"], help="write a balanced question set as JSONL + PNG")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--seed", type=int, default=HELDOUT_SEED)
    e.add_argument("--per-type", type=positive_int, default=100)
    e.add_argument("--lmms", action="store_true",
                   help="also write the lmms-eval tasks vtprune_shapes(_mc) there (lmms-eval --include_path OUT)")
    e.set_defaults(testbed_func=_export)

    t = sub.add_parser("train", help="train the built-in model (resumes from the checkpoint in OUT/state/)")
    t.add_argument("--out", required=True)
    t.add_argument("--preset", choices=("v2", "v3"), default="v2",
                   help="v2: the shipped shapes-llava recipe's defaults; v3: the built-in benchmark v3 chain "
                        "(shapes-v3 data, 32-layer decoder, calibration-split watching; train_v3.py)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps-a", type=int, default=None, help="Stage A steps (vision tower)")
    t.add_argument("--steps-b", type=int, default=None, help="Stage B steps (projector + LLM)")
    t.add_argument("--steps", type=int, default=None, help="shortcut: Stage B steps")
    t.add_argument("--batch-a", type=int, default=None)
    t.add_argument("--batch-b", type=int, default=None)
    t.add_argument("--questions-per-image", type=int, default=None)
    t.add_argument("--single-steps", type=int, default=None,
                   help="Stage B steps with one question per sequence before packing (batch --single-batch)")
    t.add_argument("--single-batch", type=int, default=None, help="images per step while --single-steps lasts")
    t.add_argument("--lr-a", type=float, default=None)
    t.add_argument("--lr-b", type=float, default=None)
    t.add_argument("--time-limit-b", type=float, default=None, help="seconds of Stage B before stopping")
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--keep-schedule", default=None,
                   help='Stage B curriculum, e.g. "600:8,1000:32": visual tokens kept until each step')
    t.add_argument("--vision-init", default=None,
                   help='load the vision tower from this checkpoint ("builtin:shapes-llava" or a dir); '
                        "use with --steps-a 0 to skip Stage A")
    t.add_argument("--init", default=None,
                   help="start from this whole checkpoint (builtin:NAME or a dir; same sizes), e.g. to "
                        "fine-tune the built-in model; use with --steps-a 0")
    t.add_argument("--projector-init", choices=("probe", "standardize"), default=None,
                   help="data-dependent projector init (default probe: standardise + per-patch read-outs)")
    t.add_argument("--column-code-scale", type=float, default=None,
                   help="probe init: scale of 23 extra column-thermometer rows (default 0 = none)")
    t.add_argument("--row-code-scale", type=float, default=None,
                   help="probe init: scale of a row thermometer in the projector rows after the column code "
                        "(default 0 = none); with --init only the code rows are written")
    t.add_argument("--feature-cache", type=int, default=None,
                   help="Stage B cycles over the frozen features of this many cached scenes (0: live)")
    t.add_argument("--type-schedule", default=None,
                   help='Stage B question-type curriculum, e.g. "800:colour+shape" (later steps: all types); '
                        'a type listed twice is asked about twice as often')
    t.add_argument("--training-types", default=None,
                   help='"+"-joined training-only question types asked with the scored ones (default "side"; '
                        '"" for none)')
    t.add_argument("--xy-object-weight", type=float, default=None,
                   help="Stage A: weight of object/digit patches in the xy regression (default 20)")
    t.add_argument("--token-xy-weight", type=float, default=None,
                   help="Stage B: weight of the training-only (x, y) read-out on projected object tokens (0 = off)")
    t.add_argument("--fetch-weight", type=float, default=None,
                   help="Stage B (shapes-v3): weight of the training-only read-out of the asked objects' centres "
                        "at each answer position (0 = off, the default)")
    t.add_argument("--fetch-layer", type=int, default=None,
                   help="decoder layer after which --fetch-weight reads the named object's centre "
                        "(default 0: half the decoder's depth)")
    t.add_argument("--fetch-attention-weight", type=float, default=None,
                   help="attention targets for fetching (default 0: off): in --fetch-attention-layer, at each answer "
                        "position head 0 attends to the named object's patches and the last head to a relation's "
                        "second object's (see --fetch-attention-at)")
    t.add_argument("--fetch-attention-layer", type=int, default=None,
                   help="decoder layer (1-based) of --fetch-attention-weight's heads (default 0: half the depth)")
    t.add_argument("--fetch-attention-at", choices=("answer", "name"), default=None,
                   help="'name': head 0 fetches each named object at the name's last word in the question and the "
                        "last head of the next layer, at the answer position, attends to those words (default: answer)")
    t.add_argument("--fetch-relay-layer", type=int, default=None,
                   help="with --fetch-attention-at name: the layer of the relay head (default 0: the next layer)")
    t.add_argument("--fetch-neighbour-layer", type=int, default=None,
                   help="with --fetch-attention-weight: the last head of this layer attends, at each leftof "
                        "question's answer position, to the left neighbour whose colour is asked (default 0: off)")
    t.add_argument("--fetch-second", action="store_true", default=None,
                   help="with --fetch-weight: the read-out after --fetch-layer also gives a relation's second named "
                        "object, so that both named objects are fetched by then")
    t.add_argument("--count-weight", type=float, default=None,
                   help="Stage B (shapes-v3): weight of the training-only count read-outs: per-patch object shares "
                        "at the image tokens and the asked count at the answer position (0 = off, the default)")
    t.add_argument("--count-layer", type=int, default=None,
                   help="decoder layer after which --count-weight reads the object shares (default 0: the first)")
    t.add_argument("--count-attention-weight", type=float, default=None,
                   help="Stage B (shapes-v3): weight of a training-only attention target for counting: one head "
                        "attends, at each count answer, uniformly to <s> and to the asked objects' centre tokens "
                        "(0 = off, the default)")
    t.add_argument("--count-attention-layer", type=int, default=None,
                   help="decoder layer (1-based) of --count-attention-weight's head (default 0: the last but one)")
    t.add_argument("--count-sink-weight", type=float, default=None,
                   help="--count-attention-weight's target weight on <s> relative to each counted object (default 1: "
                        "<s> gets 1 / (k + 1); w: w / (w + k), wider steps between the high counts)")
    t.add_argument("--count-attention-at", choices=("answer", "name"), default=None,
                   help="'name': the count target sits at the counted phrase's last word and the relay of "
                        "--fetch-attention-at name carries it to the answer (default: answer)")
    t.add_argument("--count-attention-unit", choices=("centre", "object"), default=None,
                   help="what one counted object is to that target: the patch holding its centre (default) or all "
                        "its patches together ('object': their summed attention is one unit)")
    t.add_argument("--count-attention-heads", default=None, metavar="LAYER:HEAD,...",
                   help="more heads that learn the same count target (layers 1-based, heads 0-based), e.g. 4:0,4:1")
    t.add_argument("--tower-lr", type=float, default=None,
                   help="Stage B (shapes-v3): learning rate of the vision tower, trained end to end on the answers "
                        "with Stage A's dense loss (default 0: frozen; > 0 needs --feature-cache 0)")
    t.add_argument("--tower-dense-weight", type=float, default=None,
                   help="weight of Stage A's dense per-patch loss while --tower-lr trains the tower (default 1)")
    t.add_argument("--tower-share-weight", type=float, default=None,
                   help="with --tower-lr: weight of a training-only per-patch regression of each object's pixel share "
                        "on the tower's features (summed over a colour's patches: its count; default 0 = off)")
    t.add_argument("--tower-count-target", choices=("share", "centre"), default=None,
                   help="what --tower-share-weight regresses: each object's pixel share per patch (share, the "
                        "default) or the one patch holding its centre (centre)")
    t.add_argument("--centre-spread", type=float, default=None, metavar="PIXELS",
                   help="the centre targets (--tower-count-target centre, the count attention target): 0 puts each "
                        "object on the patch holding its centre (default), > 0 splits it over the patches a square of "
                        "that side around the centre overlaps")
    t.add_argument("--count-mark", default=None, metavar="MARK[+MARK...]",
                   help="which patch carries each object in the centre targets: the one holding its centre (centre, "
                        "the default) or an extreme pixel (top, bottom, left, right); several marks joined by '+', "
                        "one per count head (--count-attention-heads)")
    t.add_argument("--centre-sum-weight", type=float, default=None,
                   help="with --tower-count-target centre: weight of the squared error of the centre probabilities "
                        "summed over the patches (the count they imply) against the true counts (default 0 = off)")
    t.add_argument("--tower-place-weight", type=float, default=None,
                   help="with --tower-lr: weight of a training-only per-patch classification of each digit with its "
                        "place in the number (tens or units) on the tower's features (default 0 = off)")
    t.add_argument("--head-fit-steps", type=int, default=None,
                   help="with --tower-lr and no Stage A in the run: steps fitting Stage A's heads on the frozen "
                        "tower first (default 200)")
    t.add_argument("--cls-steps", type=int, default=None,
                   help="Stage C: steps training the [CLS] embedding's attention on the exported model "
                        "(default 100; 0 = skip)")
    t.add_argument("--cls-lr", type=float, default=None, help="Stage C learning rate (default 0.05)")
    t.add_argument("--cls-drift-weight", type=float, default=None,
                   help="Stage C: weight of a penalty on the patch features' drift (default 0 = none; the chain: 20)")
    t.add_argument("--anneal-by-time", action="store_true", default=None,
                   help="with --time-limit-b: Stage B's cosine learning-rate schedule follows whichever of its steps "
                        "and its time limit is further along, so a run the time limit ends still anneals")
    t.add_argument("--cls-before-b", action="store_true", default=None,
                   help="run Stage C on the starting model before Stage B (needs a frozen tower, no --tower-lr), so "
                        "that Stage B's decoder adapts to the patch features it shifts")
    t.add_argument("--text-layers", type=int, default=None, help="decoder layers")
    t.add_argument("--text-width", type=int, default=None, help="decoder width (MLP 3x, head dim 32)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--procs", type=int, default=1,
                   help="data-parallel processes (of --threads threads each) sharing each step's batch; e.g. 2 on "
                        "a 2-core machine")
    t.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX)")
    t.add_argument("--tiny", action="store_true", help="tiny model (smoke tests)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(testbed_func=_train)

    c = sub.add_parser("chain", help="the v3 training chain in one resumable command (small decoder, tower, grow, "
                                     "32 layers): about 3 h on 2 CPU cores")
    c.add_argument("--out", required=True, help="chain directory (re-run the same command to resume)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--time-scale", type=float, default=1.0,
                   help="multiplies every phase's Stage-B time limit (e.g. 0.5 on a machine twice as fast)")
    c.add_argument("--vision-init", default="",
                   help="a model whose vision tower replaces Stage A (e.g. benchmarks/checkpoints/shapes-v3-wip)")
    c.add_argument("--after", default="", choices=("", "small", "tower", "grown"), metavar="PHASE",
                   help="skip the phases up to and including PHASE (small, tower or grown) and continue from "
                        "--from-model, e.g. --after tower --from-model benchmarks/checkpoints/shapes-v3-u21 grows a "
                        "4-layer model and runs the deep phase")
    c.add_argument("--from-model", default="", help="with --after: the model that phase would have produced")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=positive_int, default=2,
                   help="torch CPU threads (the phases' time limits are set for 2 on a 2-core machine)")
    c.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX)")
    c.add_argument("--tiny", action="store_true", help="tiny model, a few steps per phase (smoke tests)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(testbed_func=_chain)

    q = sub.add_parser("recipe", help="the path that reached the v3 accuracy bar in one resumable command: the "
                                      "chain's small and tower phases, soup rounds, decoder-only rounds after Stage C, "
                                      "growth to 32 layers (about 14 h on 2 CPU cores)")
    q.add_argument("--out", required=True, help="recipe directory (re-run the same command to resume)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--rounds", type=positive_int, default=None, help="soup rounds with the tower trained (default 12)")
    q.add_argument("--cls-rounds", type=int, default=None,
                   help="decoder-only rounds after Stage C (default 2; 0: no Stage C)")
    q.add_argument("--branches", type=positive_int, default=2, help="branches per round (one process and CPU each)")
    q.add_argument("--seconds", type=float, default=None, help="Stage-B seconds per branch (default 2400)")
    q.add_argument("--vision-init", default="",
                   help="a model whose vision tower replaces Stage A (e.g. benchmarks/checkpoints/shapes-v3-wip)")
    q.add_argument("--pack", default="",
                   help="a folder kept up to date with the finished phases' records and models (small: no trainer "
                        "states or caches), e.g. to commit; an --out without a recipe starts from it (another "
                        "machine's progress)")
    q.add_argument("--tiny", action="store_true", help="tiny model, a few steps per phase and branch (smoke tests)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(testbed_func=_recipe)

    m = sub.add_parser("measure", help="seconds per training step of each stage on this machine")
    m.add_argument("--preset", choices=("v2", "v3"), default="v3")
    m.add_argument("--steps", type=positive_int, default=3, help="timed steps per stage (after one warm-up)")
    m.add_argument("--threads", type=positive_int, default=1)
    m.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    m.set_defaults(testbed_func=_measure)

    g = sub.add_parser("grow", help="deepen a trained model's decoder, computing exactly the same function")
    g.add_argument("source", help="builtin:NAME or a model directory")
    g.add_argument("--layers", type=positive_int, required=True, help="decoder layers of the grown model")
    g.add_argument("--placement", choices=("spread", "spread_next", "front"), default="spread",
                   help="where the trained layers go (spread: evenly, each copy of the trained layer before it; "
                        "spread_next: evenly, each copy of the trained layer after it; front: first); the rest are "
                        "zero-output copies")
    g.add_argument("--copy-output-scale", type=float, default=0.0,
                   help="the copies' output projections as this fraction of their source's, in [0, 1] (default 0: "
                        "zero outputs, the same function; > 0 changes it, a start for training the copies)")
    g.add_argument("--out", required=True, help="new model directory (must not exist)")
    g.set_defaults(testbed_func=_grow)

    u = sub.add_parser("soup", help="average the weights of models fine-tuned from one parent (a model soup)")
    u.add_argument("sources", nargs="+", help="two or more model directories (or builtin:NAME) of one architecture")
    u.add_argument("--weights", default="", help="comma-separated non-negative weights, one per source (default: "
                                                 "the uniform mean)")
    u.add_argument("--out", required=True, help="new model directory (must not exist)")
    u.set_defaults(testbed_func=_soup)

    r = sub.add_parser("soup-rounds", help="rounds of a model soup in one resumable command: branches of a 4-layer "
                                           "v3 model trained side by side (one thread each), then their mean")
    r.add_argument("--init", required=True, help="the parent: a 4-layer v3 model directory (or builtin:NAME)")
    r.add_argument("--out", required=True, help="rounds directory (re-run the same command to resume)")
    r.add_argument("--rounds", type=positive_int, default=1)
    r.add_argument("--branches", type=positive_int, default=2, help="branches per round (one process and CPU each)")
    r.add_argument("--seconds", type=float, default=None, help="Stage-B seconds per branch (default 2400)")
    r.add_argument("--seed", type=int, default=0,
                   help="branch b of round r trains with seed SEED + (r - 1) * BRANCHES + b (fresh scenes each)")
    r.add_argument("--ema", type=float, default=0.0,
                   help="keep the moving average of each branch's weights with this decay (e.g. 0.999) and soup those "
                        "averages instead of the final weights (0: off)")
    r.add_argument("--cls-drift", type=float, default=0.0,
                   help="first Stage C on --init with this feature-drift penalty (e.g. 50), then branches that train "
                        "the decoder alone, adapting it to the tuned [CLS] embedding (0: off)")
    r.add_argument("--lr", type=float, default=None, help="the branches' peak learning rate (default 3e-4)")
    r.add_argument("--tiny", action="store_true", help="a few steps per branch (smoke tests; a tiny chain's model)")
    r.set_defaults(testbed_func=_soup_rounds)

    x = sub.add_parser("export-state", help="write a training run's newest state (not its best watched model) as a "
                                            "model directory, e.g. to score or continue it")
    x.add_argument("run", help="the run's OUT directory (holds train_config.json and state/)")
    x.add_argument("--out", required=True, help="new model directory (must not exist)")
    x.set_defaults(testbed_func=_export_state)

    s = sub.add_parser("score", help="accuracy per question type of a model on a testbed set")
    s.add_argument("--model", default="builtin:shapes-llava", help="builtin:NAME or a model directory")
    s.add_argument("--data", default=None,
                   help="JSONL from `testbed export` (default: generated held-out set)")
    s.add_argument("--seed", type=int, default=HELDOUT_SEED)
    s.add_argument("--split", default=None,
                   help='a v3 split instead of the v2 held-out set: "test[:SEED]" (30000-30002), '
                        '"calibration[:SEED]" or "train[:SEED]" (questions of shapes-v3)')
    s.add_argument("--per-type", type=positive_int, default=50)
    s.add_argument("--types", default="", help="with --split: only these question types, comma-separated (e.g. "
                                               "count; default: all seven)")
    s.add_argument("--batch-size", type=positive_int, default=16)
    s.add_argument("--records", default=None, help="write per-sample records to this JSONL")
    s.set_defaults(testbed_func=_score)


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `testbed` command."""
    return int(args.testbed_func(args) or 0)


def _export(args: argparse.Namespace) -> int:
    from vtprune.testbed.export import export_jsonl

    if getattr(args, "lmms", False):
        from vtprune.eval.lmms.task import write_task

        path = write_task(args.out, n_per_type=args.per_type, seed=args.seed)
        print(f"wrote {path} and the lmms-eval tasks vtprune_shapes, vtprune_shapes_mc "
              f"(lmms-eval --include_path {args.out} --tasks vtprune_shapes)")
        return 0
    path = export_jsonl(args.out, seed=args.seed, n_per_type=args.per_type)
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vtprune.commands.common import UsageError, check_model

    for init in (args.init, args.vision_init):
        if init is not None:
            check_model(init)
    from vtprune.testbed.model import TINY
    from vtprune.testbed.train import TrainConfig, train

    if getattr(args, "preset", "v2") == "v3":
        from vtprune.testbed.train_v3 import v3_config

        cfg = v3_config(seed=args.seed)
        cfg.threads = args.threads
    else:
        cfg = TrainConfig(seed=args.seed, threads=args.threads)
    if args.procs < 1:
        raise UsageError(f"--procs must be >= 1, got {args.procs}")
    cfg.procs = args.procs
    if args.tiny:
        from vtprune.testbed.train_v3 import TINY_V3

        cfg.size = TINY_V3 if cfg.data == "shapes-v3" else TINY
    steps_b = args.steps_b if args.steps_b is not None else args.steps  # 0 is a value: no Stage B
    overrides = {"steps_a": args.steps_a, "steps_b": steps_b, "batch_a": args.batch_a,
                 "batch_b": args.batch_b, "questions_per_image": args.questions_per_image,
                 "single_steps": args.single_steps, "single_batch": args.single_batch,
                 "time_limit_b": args.time_limit_b, "eval_every": args.eval_every,
                 "keep_schedule": args.keep_schedule, "lr_a": args.lr_a, "lr_b": args.lr_b}
    overrides.update({"vision_init": args.vision_init, "projector_init": args.projector_init,
                      "feature_cache": args.feature_cache, "type_schedule": args.type_schedule,
                      "xy_object_weight": args.xy_object_weight, "token_xy_weight": args.token_xy_weight,
                      "column_code_scale": args.column_code_scale, "init": args.init,
                      "row_code_scale": args.row_code_scale,
                      "training_types": args.training_types, "cls_steps": args.cls_steps,
                      "cls_lr": args.cls_lr, "cls_drift_weight": args.cls_drift_weight,
                      "fetch_weight": args.fetch_weight,
                      "fetch_layer": args.fetch_layer, "count_weight": args.count_weight,
                      "count_layer": args.count_layer, "tower_lr_b": args.tower_lr,
                      "count_attention_weight": args.count_attention_weight,
                      "count_attention_layer": args.count_attention_layer,
                      "count_sink_weight": args.count_sink_weight,
                      "count_attention_at": args.count_attention_at,
                      "count_attention_unit": args.count_attention_unit,
                      "count_attention_heads": args.count_attention_heads,
                      "tower_dense_weight": args.tower_dense_weight, "head_fit_steps": args.head_fit_steps,
                      "tower_share_weight": args.tower_share_weight,
                      "tower_count_target": args.tower_count_target, "centre_spread": args.centre_spread,
                      "count_mark": args.count_mark, "centre_sum_weight": args.centre_sum_weight,
                      "tower_place_weight": args.tower_place_weight, "cls_before_b": args.cls_before_b,
                      "fetch_second": args.fetch_second,
                      "fetch_attention_weight": args.fetch_attention_weight,
                      "fetch_attention_layer": args.fetch_attention_layer,
                      "fetch_attention_at": args.fetch_attention_at,
                      "fetch_relay_layer": args.fetch_relay_layer,
                      "fetch_neighbour_layer": args.fetch_neighbour_layer,
                      "anneal_by_time": args.anneal_by_time})
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.bf16 = _bf16(args.precision, args.device)
    if args.text_layers is not None:
        cfg.size = replace(cfg.size, text_layers=args.text_layers)
    if args.text_width is not None:
        w = args.text_width
        cfg.size = replace(cfg.size, text_width=w, text_heads=max(1, w // 32), text_mlp=3 * w)
    for name in ("batch_a", "batch_b", "single_batch"):
        if getattr(cfg, name) % cfg.procs:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not divisible by --procs {cfg.procs}")
    if cfg.procs > 1:
        from vtprune.testbed.parallel_launch import train_parallel

        train_parallel(args.out, cfg, device=args.device)
    else:
        train(args.out, cfg, device=args.device, progress=not args.no_progress)
    return 0


def _chain(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model
    from vtprune.testbed.chain_v3 import run_chain

    if args.vision_init:
        check_model(args.vision_init)
    if not args.time_scale > 0:
        raise UsageError(f"--time-scale must be > 0, got {args.time_scale}")
    if bool(args.after) != bool(args.from_model):
        raise UsageError("--after and --from-model go together (the phase to start after and the model it hands "
                         "over)")
    if args.from_model and not Path(args.from_model).is_dir():
        raise UsageError(f"--from-model {args.from_model} is not a model directory (expected a directory saved with "
                         f"save_pretrained, e.g. benchmarks/checkpoints/shapes-v3-u21)")
    final = run_chain(args.out, seed=args.seed, time_scale=args.time_scale, tiny=args.tiny, threads=args.threads,
                      bf16=_bf16(args.precision, args.device), device=args.device, vision_init=args.vision_init,
                      progress=not args.no_progress, after=args.after, from_model=args.from_model)  # fmt: skip
    print(f"chain done: {final}")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model
    from vtprune.testbed.recipe_v3 import CLS_ROUNDS, ROUNDS, check_request, run_recipe
    from vtprune.testbed.soup_rounds import BRANCH_SECONDS

    if args.vision_init:
        check_model(args.vision_init)
    rounds = ROUNDS if args.rounds is None else args.rounds
    cls_rounds = CLS_ROUNDS if args.cls_rounds is None else args.cls_rounds
    seconds = BRANCH_SECONDS if args.seconds is None else args.seconds
    try:
        check_request(rounds, cls_rounds, args.branches, seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    final = run_recipe(args.out, seed=args.seed, rounds=rounds, cls_rounds=cls_rounds, branches=args.branches,
                       seconds=seconds, vision_init=args.vision_init, tiny=args.tiny, progress=not args.no_progress,
                       pack=args.pack)
    print(f"recipe done: {final / 'model'} (lineage: {Path(args.out) / 'lineage.json'})")
    return 0


def _soup_rounds(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model
    from vtprune.testbed.soup_rounds import BRANCH_LR, BRANCH_SECONDS, run_soup_rounds

    if args.init.startswith(("arch:", "tiny:")):
        raise UsageError(f"--init takes builtin:NAME or a model directory, got {args.init!r}")
    check_model(args.init)
    init = args.init
    if init.startswith("builtin:"):
        from vtprune.testbed.builtin import builtin_path

        init = str(builtin_path(init.removeprefix("builtin:")))
    seconds = BRANCH_SECONDS if args.seconds is None else args.seconds
    if not seconds > 0:
        raise UsageError(f"--seconds must be > 0, got {seconds}")
    if not 0.0 <= args.ema < 1.0:
        raise UsageError(f"--ema must be in [0, 1) (0: off), got {args.ema}")
    if not args.cls_drift >= 0.0:
        raise UsageError(f"--cls-drift must be >= 0 (0: no Stage C), got {args.cls_drift}")
    lr = BRANCH_LR if args.lr is None else args.lr
    if not lr > 0:
        raise UsageError(f"--lr must be > 0 (the branches' peak learning rate; default {BRANCH_LR:g}), got {lr}")
    final = run_soup_rounds(args.out, init, rounds=args.rounds, branches=args.branches, seconds=seconds,
                            seed=args.seed, ema_decay=args.ema, cls_drift=args.cls_drift, lr=lr, tiny=args.tiny)
    print(f"soup-rounds done: {final}")
    return 0


def _bf16(precision: str, device: str) -> bool:
    from vtprune.testbed.train import fast_bf16

    return fast_bf16(device) if precision == "auto" else precision == "bf16"


def _measure(args: argparse.Namespace) -> int:
    from vtprune.testbed.train import TrainConfig
    from vtprune.testbed.train_v3 import estimate_chain_seconds, measure_step_costs, v3_config

    cfg = v3_config() if args.preset == "v3" else TrainConfig()
    cfg.bf16 = _bf16(args.precision, "cpu")
    keep = (96, 192, None) if args.preset == "v3" else (None,)
    costs = measure_step_costs(cfg, steps=args.steps, keep=keep, threads=args.threads)
    if args.preset == "v3":
        costs["chain_estimate_h_without_eval_and_cache"] = round(estimate_chain_seconds(costs, cfg) / 3600, 2)
    costs["precision"] = "bf16 autocast" if cfg.bf16 else "fp32"
    print(json.dumps(costs, indent=1))
    return 0


def _export_state(args: argparse.Namespace) -> int:
    from vtprune.checkpointing import CheckpointError
    from vtprune.commands.common import UsageError
    from vtprune.testbed.train import export_latest

    try:
        step, stage = export_latest(args.run, args.out)
    except (FileExistsError, FileNotFoundError, CheckpointError) as err:
        raise UsageError(str(err)) from None
    print(f"wrote {args.out}: {args.run}'s state at stage {stage} step {step}")
    return 0


def _grow(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model
    from vtprune.testbed.grow import grow_saved

    if args.source.startswith(("arch:", "tiny:")):
        raise UsageError(f"grow takes builtin:NAME or a model directory, got {args.source!r}")
    check_model(args.source)
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists (give a new directory)")
    try:
        src_layers = grow_saved(args.source, out, args.layers, args.placement, args.copy_output_scale)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    same = "same outputs" if args.copy_output_scale == 0 else f"copies' outputs × {args.copy_output_scale:g}"
    print(f"wrote {out}: decoder {src_layers} -> {args.layers} layers ({args.placement}), {same}")
    return 0


def _soup(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model
    from vtprune.testbed.soup import soup_saved

    if len(args.sources) < 2:
        raise UsageError(f"soup needs at least two models, got {len(args.sources)}")
    for source in args.sources:
        if source.startswith(("arch:", "tiny:")):
            raise UsageError(f"soup takes builtin:NAME or model directories, got {source!r}")
        check_model(source)
    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
        if len(weights) != len(args.sources):
            raise UsageError(f"--weights needs one number per model ({len(args.sources)}), got {len(weights)}")
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists (give a new directory)")
    try:
        soup_saved(args.sources, out, weights)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}: the {'weighted' if weights else 'uniform'} mean of {len(args.sources)} models")
    return 0


def _score(args: argparse.Namespace) -> int:
    from vtprune.commands.common import UsageError, check_model, check_path
    from vtprune.eval.shapes import load_model
    from vtprune.testbed.data import balanced_samples
    from vtprune.testbed.evaluate import evaluate, majority_baseline
    from vtprune.testbed.export import read_jsonl

    check_model(args.model)
    check_path(args.data, "data file", "file")
    answers = None
    if args.data and args.split:
        raise UsageError("give either --data or --split, not both")
    if args.types and not args.split:
        raise UsageError("--types chooses question types of a v3 split: give --split too")
    if args.data:
        samples, root = read_jsonl(args.data)
    elif args.split:
        from vtprune.testbed.data_v3 import balanced_samples
        from vtprune.testbed.questions_v3 import QUESTION_TYPES, answer_vocabulary
        from vtprune.testbed.splits import parse_split

        types = tuple(t for t in args.types.split(",") if t) or None
        unknown = sorted(set(types or ()) - set(QUESTION_TYPES))
        if unknown:
            raise UsageError(f"--types: unknown question type {', '.join(unknown)} (accepted: "
                             f"{', '.join(QUESTION_TYPES)})")
        samples, root = balanced_samples(parse_split(args.split), args.per_type, types), None
        answers = answer_vocabulary()
    else:
        samples, root = balanced_samples(args.seed, args.per_type, id_prefix="score"), None
    if not samples:
        raise UsageError(f"no questions to score in {args.data} (an empty input is refused)")
    model, processor = load_model(args.model)
    res = evaluate(model, processor, samples, batch_size=args.batch_size, image_root=root, progress=True,
                   answers=answers)
    res["majority"] = majority_baseline(samples)
    if args.records:
        with open(args.records, "w") as f:
            for r in res["records"]:
                f.write(json.dumps(r) + "\n")
    from vtprune.tables import to_json

    print(to_json({k: v for k, v in res.items() if k != "records"}), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m vtprune.commands.testbed train --out DIR` (errors as `vtprune` reports)."""
    from vtprune.commands.common import Parser, guarded, split_debug

    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="vtprune")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return guarded(lambda: run(parser.parse_args(["testbed", *argv])), "vtprune testbed", debug)


if __name__ == "__main__":
    raise SystemExit(main())
