"""Continue a 4-layer v3 model with the chain's tower-phase configuration, changed as the options say.

    python benchmarks/v3_continue_tower.py OUT --init benchmarks/checkpoints/shapes-v3-chain6-tower \
        --centre --count-times 4 [--lr 3e-4] [--seconds 4800] [--threads 1] [--heads L:H,...] [--steps N] \
        [--count-weight 1] [--seed 0] [--spread PIXELS] [--count-at name] [--mark centre+top+left] [--sum-weight 1]

The nineteenth session's u15 (`shapes-v3-u15`, 0.92 on 700 calibration questions) is the command above; u16 added
`--heads 4:0,4:1 --steps 3950`. The configuration is `chain_v3.phases()`'s tower phase with: decoder and tower
learning rate `--lr` (the chain: 6e-4), the tower's count target `centre` with `--centre` (the chain: `share`),
count asked `--count-times` times in the chain's type list (the chain: 2), Stage-B time limit `--seconds` (the
learning rate anneals by it), extra count heads (`TrainConfig.count_attention_heads`), the count attention target's
weight `--count-weight` (the chain: 1), the training seed `--seed` (Stage B reads train-split scenes of seed + 1: a
continuation of a continuation sees fresh scenes with another seed), the centre targets' spread `--spread`
(`TrainConfig.centre_spread`, the chain: 0), the patch each object's unit sits on `--mark`
(`TrainConfig.count_mark`: its centre, the chain's, or an extreme pixel; several marks, one per count head: `--mark
centre+top+left --heads 4:0,4:1`), the weight of the summed-count term on the tower's centre classifier `--sum-weight`
(`TrainConfig.centre_sum_weight`, the chain: 0), and with `--count-at name`
the count target at the counted phrase's last word in head 0 of the fetch layer (`chain_v3.FETCH_ATTENTION_LAYER`,
the head that fetches named objects; the relay carries it to the answer; the chain: at the answer position in head 0
of `chain_v3.COUNT_ATTENTION_LAYER`). `--ema DECAY` also exports the moving average of the
weights (`TrainConfig.ema_decay`) as `OUT/model_ema`. Resumable: the same command continues `OUT`. fp32.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from vtprune.testbed import chain_v3
from vtprune.testbed.soup_rounds import tower_types
from vtprune.testbed.train import train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--init", required=True, help="a 4-layer v3 model directory")
    ap.add_argument("--count-times", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--centre", action="store_true", help="the tower's centre count target (default: share)")
    ap.add_argument("--seconds", type=float, default=4800.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", default="", help="TrainConfig.count_attention_heads")
    ap.add_argument("--steps", type=int, default=0, help="Stage-B step cap (0: the chain's)")
    ap.add_argument("--count-weight", type=float, default=1.0, help="TrainConfig.count_attention_weight")
    ap.add_argument("--seed", type=int, default=0, help="TrainConfig.seed")
    ap.add_argument("--spread", type=float, default=0.0, help="TrainConfig.centre_spread (pixels)")
    ap.add_argument("--mark", default="centre", help="TrainConfig.count_mark: marks of scenes_v3.COUNT_MARKS joined "
                                                     "by '+', one per count head (--heads)")
    ap.add_argument("--sum-weight", type=float, default=0.0, help="TrainConfig.centre_sum_weight (needs --centre)")
    ap.add_argument("--count-at", choices=("answer", "name"), default="answer", help="TrainConfig.count_attention_at")
    ap.add_argument("--ema", type=float, default=0.0, help="TrainConfig.ema_decay: also export the moving average of "
                                                           "the weights as OUT/model_ema (0: off)")
    a = ap.parse_args(argv)
    if a.count_times < 1:
        raise SystemExit("--count-times must be >= 1")
    if a.count_weight <= 0:
        raise SystemExit("--count-weight must be > 0 (the chain's count target is always on)")
    tower = {p.name: p for p in chain_v3.phases(seed=a.seed)}["tower"]
    cfg = tower.config(a.init)
    cfg = replace(cfg, lr_b=a.lr, tower_lr_b=a.lr, type_schedule=tower_types(a.count_times), time_limit_b=a.seconds,
                  threads=a.threads, bf16=False, count_attention_heads=a.heads, steps_b=a.steps or cfg.steps_b,
                  tower_count_target="centre" if a.centre else cfg.tower_count_target,
                  count_attention_weight=a.count_weight, centre_spread=a.spread, count_mark=a.mark,
                  centre_sum_weight=a.sum_weight, ema_decay=a.ema)  # fmt: skip
    if a.count_at == "name":
        cfg = replace(cfg, count_attention_at="name", count_attention_layer=chain_v3.FETCH_ATTENTION_LAYER)
    print(cfg)
    train(a.out, cfg, progress=False)


if __name__ == "__main__":
    main()
