"""Stage-B controls of the v3 built-in model: can a decoder learn the v3 questions, and from which batches?

    # a decoder on *ideal* visual tokens (one-hot Stage-A targets of each patch + its row and column)
    python benchmarks/v3_stage_b_control.py train --decoder 3x160 --batch 64 --questions-per-image 1 \
        --keep 16 --types colour --steps 600
    # the same decoder recipe on the real frozen tower's cached features (a training run's state and cache)
    python benchmarks/v3_stage_b_control.py train --features real --state RUN/state/step-N \
        --cache RUN/features.safetensors --decoder 32x64 --batch 64 --questions-per-image 1 --keep 16 ...
    # teacher-forced calibration accuracy of a training run's latest state at 16 key tokens and at all 576
    python benchmarks/v3_stage_b_control.py score RUN --keep 16,576

Every number is teacher-forced answer accuracy (argmax over the answer vocabulary at the answer position) on
the calibration split (30 questions per type by default; the training-only types `side` / `upper` are watched too
when `--type-schedule` asks them), one question per sequence, the kept tokens chosen
as in training (`train.shorten`: object centres and digits first). docs/testbed.md ("v3 training: second
session") lists the runs made with it. One CPU thread; bf16 autocast in training.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vtprune import checkpointing as cpt
from vtprune.testbed import data_v3, splits
from vtprune.testbed.data import Packing, pixels
from vtprune.testbed.features import vision_features
from vtprune.testbed.model import V3
from vtprune.testbed.questions import Question
from vtprune.testbed.questions_v3 import QUESTION_TYPES, TRAINING_TYPES, answer_vocabulary
from vtprune.testbed.scenes_v3 import GRID
from vtprune.testbed.train import _schedule, decoder_hidden, lm_loss, shorten, types_at

N_PATCHES = GRID * GRID


def ideal_features(scene, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal tokens [576, width] (one-hot colour 0..6, shape 7..11, digit 12..22, row 23..46, column 47..70,
    centred and scaled) and the priority map [576] (2 key patches, 1 other informative, 0 background)."""
    _, lab, inf = data_v3.render_with_targets(scene, image=False)
    f = np.zeros((N_PATCHES, width), np.float32)
    r = np.arange(N_PATCHES)
    f[r, lab["colour"].reshape(-1)] = 1
    f[r, 7 + lab["shape"].reshape(-1)] = 1
    f[r, 12 + lab["digit"].reshape(-1)] = 1
    f[r, 23 + r // GRID] = 1
    f[r, 47 + r % GRID] = 1
    return (f - 0.1) * 3, data_v3.token_priority(scene, lab, inf)


def decoder_size(text: str):
    layers, width = (int(v) for v in text.lower().split("x"))
    return replace(V3, text_layers=layers, text_width=width, text_mlp=3 * width, text_heads=max(2, width // 32))


class Watched:
    """Calibration questions (one per sequence) with their features and priority maps."""

    def __init__(self, per_type: int, feats_of, types: tuple[str, ...] = QUESTION_TYPES) -> None:
        self.samples = data_v3.balanced_samples(splits.calibration_split(), per_type, types=types)
        enc = [data_v3.encode_conversation([Question(s["type"], s["question"], s["answer"])], Packing(1))
               for s in self.samples]
        self.ids = torch.tensor([e[0] for e in enc])
        self.labels = torch.tensor([e[1] for e in enc])
        self.feats, self.priority = feats_of(self.samples)
        vocab = data_v3.vocabulary()
        self.answers = torch.tensor([vocab[w] for w in answer_vocabulary()])

    @torch.no_grad()
    def score(self, model, keep: int) -> dict[str, float]:
        was = model.training
        model.eval()
        hits: dict[str, list[int]] = {}
        for b0 in range(0, len(self.samples), 32):
            sl = slice(b0, b0 + 32)
            text = {"input_ids": self.ids[sl], "labels": self.labels[sl],
                    "attention_mask": (self.ids[sl] != 0).long()}
            f = self.feats[sl]
            if keep < N_PATCHES:
                text, f = shorten({**text, "priority": self.priority[sl], "informative": self.priority[sl] > 0}, f,
                                  keep, torch.Generator().manual_seed(0))
            h = decoder_hidden(model, f, text["input_ids"], text["attention_mask"], text.get("position_ids"))
            j = (text["labels"] != -100).float().argmax(1)  # [B] the answer's position
            rows = torch.arange(len(j))
            logits = model.lm_head(h[rows, j - 1]).float()
            pred = self.answers[logits[:, self.answers].argmax(1)]
            for k in range(len(j)):
                hits.setdefault(self.samples[b0 + k]["type"], []).append(int(pred[k] == text["labels"][k, j[k]]))
        model.train(was)
        out = {t: round(float(np.mean(v)), 3) for t, v in sorted(hits.items())}
        out["overall"] = round(float(np.mean([x for v in hits.values() for x in v])), 3)
        return out


def real_feats_of(model):
    def feats_of(samples):
        pri = []
        for s in samples:
            _, lab, inf = data_v3.render_with_targets(s["scene"], image=False)
            pri.append(data_v3.token_priority(s["scene"], lab, inf))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = torch.cat([vision_features(model, pixels([s["image"] for s in samples[i:i + 16]])).float()
                               for i in range(0, len(samples), 16)])
        return feats, torch.from_numpy(np.stack(pri))
    return feats_of


def train_control(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    size = decoder_size(args.decoder)
    model = data_v3.build_model(size, seed=args.seed)
    split = splits.train_split(1)  # the Stage-B scenes of training seed 0
    schedule_types = {t for part in filter(None, args.type_schedule.split(",")) for t in part.split(":")[1].split("+")}
    watch = QUESTION_TYPES + tuple(t for t in TRAINING_TYPES if t in schedule_types)  # training-only types watched too
    t0 = time.time()
    if args.features == "real":
        saved = cpt.load_state(Path(args.state), "state", "cpu")["model"]
        keep_keys = ("vision_tower", "multi_modal_projector")  # the tower and its probe-initialised projector
        model.load_state_dict({k: v for k, v in saved.items() if any(p in k for p in keep_keys)}, strict=False)
        from safetensors import safe_open

        with safe_open(args.cache, framework="pt") as fh:
            cache = fh.get_tensor("feats")[: args.scenes].float()
        pri = []
        for i in range(len(cache)):
            _, lab, inf = data_v3.render_with_targets(split.scene(i), image=False)
            pri.append(data_v3.token_priority(split.scene(i), lab, inf))
        pri_t = torch.from_numpy(np.stack(pri))
        watched = Watched(args.per_type, real_feats_of(model), watch)
    else:
        made = [ideal_features(split.scene(i), size.vision_width) for i in range(args.scenes)]
        cache = torch.from_numpy(np.stack([m[0] for m in made]))
        pri_t = torch.from_numpy(np.stack([m[1] for m in made]))

        def feats_of(samples):
            made = [ideal_features(s["scene"], size.vision_width) for s in samples]
            return torch.from_numpy(np.stack([m[0] for m in made])), torch.from_numpy(np.stack([m[1] for m in made]))

        watched = Watched(args.per_type, feats_of, watch)
    print(f"features of {len(cache)} scenes ready in {time.time() - t0:.0f}s", flush=True)
    if args.init in ("zero", "scaled"):
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                    w.mul_(0.0 if args.init == "zero" else (2 * size.text_layers) ** -0.5)
    if args.qk_std or args.init_std:
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, w in model.model.language_model.named_parameters():
                std = args.qk_std if (args.qk_std and any(k in name for k in ("q_proj", "k_proj"))) else args.init_std
                if std and w.dim() == 2:
                    w.copy_(torch.randn(w.shape, generator=gen) * std)
    params = (list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
              + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    packing = Packing(args.questions_per_image)
    types = tuple(args.types.split("+")) if args.types else QUESTION_TYPES
    schedule = args.type_schedule or f"100000:{'+'.join(types)}"
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = [(step * args.batch + i) % len(cache) for i in range(args.batch)]
        batch = data_v3.question_batch(split, 0, 0, packing, indices=idx, salt=step * args.batch // len(cache),
                                       with_pixels=False, types=types_at(schedule, step, "",
                                                                         QUESTION_TYPES, TRAINING_TYPES))
        for g in opt.param_groups:
            g["lr"] = args.lr * _schedule(step, args.steps, 50)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            text, f = shorten({**batch, "priority": pri_t[idx]}, cache[idx], args.keep,
                              torch.Generator().manual_seed(step))
            loss, acc = lm_loss(model, f, **text)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} {time.time() - t0:.0f}s loss {loss.item():.3f} answer-acc {acc:.2f}", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"watched step {step + 1} keep {args.keep}: {watched.score(model, args.keep)}", flush=True)


def score_run(args: argparse.Namespace) -> None:
    folder = cpt.latest(Path(args.run) / "state", "")
    if folder is None:
        raise SystemExit(f"no training state under {args.run}/state")
    saved = cpt.load_state(folder, "state", "cpu")
    model = data_v3.build_model(V3, seed=0)
    model.load_state_dict(saved["model"])
    watched = Watched(args.per_type, real_feats_of(model))
    for keep in (int(k) for k in args.keep.split(",")):
        print(f"{args.run} step {saved['st']['step']} keep {keep}: {watched.score(model, keep)}", flush=True)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a decoder on ideal or cached real features; print watched accuracy")
    t.add_argument("--features", choices=("ideal", "real"), default="ideal")
    t.add_argument("--state", help="real features: a training state folder (its tower and projector are used)")
    t.add_argument("--cache", help="real features: that run's features.safetensors (train split, seed 1)")
    t.add_argument("--decoder", default="32x64", help="LAYERSxWIDTH (heads of 32, MLP 3x width)")
    t.add_argument("--init", choices=("default", "zero", "scaled"), default="default",
                   help="residual output projections: HF init, zero, or scaled by 1/sqrt(2L)")
    t.add_argument("--qk-std", type=float, default=0.0, help="re-initialise q/k projections with this std (0 = HF)")
    t.add_argument("--init-std", type=float, default=0.0,
                   help="re-initialise every other decoder matrix (embeddings included) with this std (0 = HF)")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast (faster on CPUs without AVX512-BF16/AMX)")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--questions-per-image", type=int, default=1)
    t.add_argument("--keep", type=int, default=16, help="visual tokens kept (key patches first)")
    t.add_argument("--types", default="", help='"+"-joined question types (default all seven)')
    t.add_argument("--type-schedule", default="",
                   help='"UNTIL:TYPES,...", e.g. "500:colour+shape,100000:exist+colour+shape" (overrides --types)')
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--scenes", type=int, default=2000, help="cached training scenes cycled over")
    t.add_argument("--eval-every", type=int, default=300)
    t.add_argument("--per-type", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="teacher-forced calibration accuracy of a training run's latest state")
    s.add_argument("run")
    s.add_argument("--keep", default="16,576")
    s.add_argument("--per-type", type=int, default=30)
    args = p.parse_args()
    if args.cmd == "train":
        if args.features == "real" and not (args.state and args.cache):
            p.error("--features real needs --state and --cache")
        train_control(args)
    else:
        score_run(args)


if __name__ == "__main__":
    main()
