"""Two-stage curriculum that trains the built-in model on CPU in about an hour.

Stage A trains the CLIP tower alone with dense per-patch targets (colour, shape, digit, and the
patch's normalised x/y) through a linear head on the penultimate layer, the feature LLaVA feeds to
the projector. The head is training-only and is not saved with the model. Stage B freezes the tower
(its forward runs under no_grad) and trains projector + Llama decoder on several questions packed
into one conversation per image, padded to a fixed length. Both stages use bf16 autocast on CPU.
Checkpoints (`DIR/state.pt`) are written every `save_every` steps and a run resumes from them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import EVAL_SEED, Packing, balanced_samples, dense_batch, question_batch
from .evaluate import evaluate, majority_baseline
from .model import ModelSize, build_model
from .questions import QUESTION_TYPES
from .scenes import COLOURS, DATA_VERSION, SHAPES
from .tokenizer import build_processor, vocabulary

IMAGE_TOKEN_ID = vocabulary()["<image>"]


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
    threads: int = 1
    bf16: bool = True

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

    def loss(self, feats: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """feats [B, 576, D] (no [CLS]); targets [B, 576] ints and xy [B, 576, 2]."""
        feats = feats.float()
        total, stats = feats.new_zeros(()), {}
        for name in ("colour", "shape", "digit"):
            logits = getattr(self, name)(feats)
            k = logits.shape[-1]
            weight = torch.full((k,), 20.0, device=feats.device)
            weight[0] = 1.0  # background patches dominate; up-weight object patches
            y = target[name]
            total = total + F.cross_entropy(logits.reshape(-1, k), y.reshape(-1), weight=weight)
            fg = y > 0
            stats[name] = (logits.argmax(-1)[fg] == y[fg]).float().mean().item() if fg.any() else float("nan")
        total = total + 10.0 * F.mse_loss(self.xy(feats), target["xy"])
        return total, stats


@contextmanager
def penultimate_only(vision_tower: nn.Module):
    """Run the CLIP tower without its last layer: last_hidden_state == hidden_states[-2] of the full tower."""
    enc = getattr(vision_tower, "vision_model", vision_tower).encoder
    layers = enc.layers
    enc.layers = layers[:-1]
    try:
        yield
    finally:
        enc.layers = layers


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer patch features without [CLS]: [B, 3, 336, 336] -> [B, 576, Dv]."""
    tower = model.model.vision_tower
    with penultimate_only(tower):
        return tower(pixel_values=pixel_values).last_hidden_state[:, 1:]


def shorten(batch: dict[str, torch.Tensor], feats: torch.Tensor, keep: int,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Curriculum helper: keep `keep` of the 576 visual tokens per sample (all informative ones plus random
    background ones, raster order) with their original position ids, like a pre-LLM pruning.

    feats [B, 576, Dv] -> [B, keep, Dv]; ids/labels/mask [B, T] -> [B, T - 576 + keep]; adds position_ids.
    """
    b, n = batch["informative"].shape
    score = torch.rand(b, n, generator=generator) + 2.0 * batch["informative"].cpu().float()
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


def keep_at(schedule: str, step: int) -> int | None:
    """Visual tokens kept at a Stage-B step under a "until:keep,..." schedule (None: all)."""
    for part in filter(None, schedule.split(",")):
        until, keep = (int(v) for v in part.split(":"))
        if step < until:
            return keep
    return None


@torch.no_grad()
def standardize_projector(model, seed: int, device: str, n: int = 16) -> None:
    """Data-dependent projector init: fold the per-channel mean/std of the frozen penultimate features
    into the first projector layer, so it sees standardised inputs (the raw features share a large
    common offset that would otherwise make all visual tokens look alike to the decoder)."""
    pv, _ = dense_batch(seed, 0, n)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        feats = vision_features(model, pv.to(device)).float()
    mu, sd = feats.mean((0, 1)), feats.std((0, 1)).clamp_min(1e-3)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sd)
    lin.bias.sub_(lin.weight @ mu)


def lm_loss(model, feats: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Projector + decoder on image features [B, N, Dv] and packed ids [B, T] (N image tokens);
    next-token CE on answers."""
    image_feats = model.model.multi_modal_projector(feats)
    embeds = model.model.language_model.get_input_embeddings()(input_ids)
    mask = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_feats.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel]).float()
    loss = F.cross_entropy(logits, target[sel])
    return loss, (logits.argmax(-1) == target[sel]).float().mean().item()


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


def train(out: str | Path, config: TrainConfig | None = None, device: str = "cpu",
          log: Callable[[str], None] = print, progress: bool = True):
    """Run (or resume) both stages into `out`; returns the final model. The best Stage-B model by
    (worst type, overall) on the held-out eval set is exported to `out/model` with the processor."""
    cfg = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.size, seed=cfg.seed).to(device)
    processor = build_processor()
    heads = DenseHeads(cfg.size.vision_width).to(device)
    amp = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if cfg.bf16
           else nullcontext())
    state_path = out / "state.pt"
    st = {"stage": "A", "step": 0, "wall": 0.0, "history": [], "best": None}
    opt_a = torch.optim.AdamW(list(model.model.vision_tower.parameters()) + list(heads.parameters()),
                              lr=cfg.lr_a, weight_decay=cfg.weight_decay)
    b_params = (list(model.model.multi_modal_projector.parameters())
                + list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    opt_b = torch.optim.AdamW(b_params, lr=cfg.lr_b, weight_decay=cfg.weight_decay)
    if state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        opt_a.load_state_dict(saved["opt_a"])
        if saved["opt_b"] is not None:  # None: Stage B restarted from scratch
            opt_b.load_state_dict(saved["opt_b"])
        st = saved["st"]
        if st["stage"] == "done" and st["step"] < cfg.steps_b and not st.get("target_reached"):
            st["stage"] = "B"  # resumed with a longer Stage B
        log(f"resumed: stage {st['stage']} step {st['step']}")
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt_a": opt_a.state_dict(),
                    "opt_b": opt_b.state_dict(), "st": st}, tmp)
        tmp.replace(state_path)

    eval_set = balanced_samples(cfg.eval_seed, cfg.eval_per_type, id_prefix="eval")
    bar = _progress() if progress else None
    ctx = bar if bar is not None else nullcontext()
    with ctx:
        # ---- Stage A: vision tower with dense per-patch targets ----
        if st["stage"] == "A":
            model.train()
            task = bar.add_task("stage A", total=cfg.steps_a, completed=st["step"], info="") if bar else None
            while st["step"] < cfg.steps_a:
                t0 = time.time()
                pv, target = dense_batch(cfg.seed, st["step"] * cfg.batch_a, cfg.batch_a)
                pv, target = pv.to(device), {k: v.to(device) for k, v in target.items()}
                for g in opt_a.param_groups:
                    g["lr"] = cfg.lr_a * _schedule(st["step"], cfg.steps_a, cfg.warmup)
                with amp:
                    loss, stats = heads.loss(vision_features(model, pv), target)
                opt_a.zero_grad(set_to_none=True)
                loss.backward()
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
            save()
        # ---- Stage B: frozen tower, projector + decoder on packed questions ----
        packing = Packing(cfg.questions_per_image)
        model.model.vision_tower.requires_grad_(False)
        model.train()
        model.model.vision_tower.eval()
        if not st.get("projector_standardized"):
            standardize_projector(model, cfg.seed + 2, device)
            st["projector_standardized"] = True
        task = bar.add_task("stage B", total=cfg.steps_b, completed=st["step"], info="") if bar else None
        b_start_wall = st.get("b_wall0", st["wall"])
        st["b_wall0"] = b_start_wall
        while st["step"] < cfg.steps_b and st["stage"] == "B":
            t0 = time.time()
            batch = question_batch(cfg.seed + 1, st["step"] * cfg.batch_b, cfg.batch_b, packing)
            batch = {k: v.to(device) for k, v in batch.items()}
            for g in opt_b.param_groups:
                g["lr"] = cfg.lr_b * _schedule(st["step"], cfg.steps_b, cfg.warmup)
            with amp:
                with torch.no_grad():
                    feats = vision_features(model, batch["pixel_values"])
                keep = keep_at(cfg.keep_schedule, st["step"])
                short = keep is not None
                if short:
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st["step"])
                    text, feats = shorten(batch, feats, keep, gen)
                else:
                    text = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
                loss, acc = lm_loss(model, feats, **text)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(b_params, 1.0)
            opt_b.step()
            st["step"] += 1
            st["wall"] += time.time() - t0
            info = f"loss {loss.item():.3f} tok-acc {acc:.2f}" + (f" keep {keep}" if short else "")
            if bar:
                bar.update(task, completed=st["step"], info=info)
            if st["step"] % 25 == 0:
                st["history"].append({"stage": "B", "step": st["step"], "wall": round(st["wall"], 1),
                                      "loss": round(loss.item(), 4), "token_acc": round(acc, 4)})
                log(f"B {st['step']} {st['wall']:.0f}s {info}")
            over_time = cfg.time_limit_b > 0 and st["wall"] - b_start_wall > cfg.time_limit_b
            if st["step"] % cfg.eval_every == 0 or st["step"] == cfg.steps_b or over_time:
                res = evaluate(model, processor, eval_set, batch_size=16)
                model.train()
                model.model.vision_tower.eval()
                rec = {"stage": "B-eval", "step": st["step"], "wall": round(st["wall"], 1),
                       "accuracy": round(res["accuracy"], 4),
                       "per_type": {k: round(v, 4) for k, v in res["per_type"].items()}}
                st["history"].append(rec)
                log(json.dumps(rec))
                key = (min(res["per_type"].values()), res["accuracy"])
                if st["best"] is None or key >= tuple(st["best"]["key"]):
                    st["best"] = {"key": list(key), "step": st["step"], **rec}
                    export(model, processor, out / "model")
                    log(f"exported best model at step {st['step']}")
                if key[0] >= cfg.target_min_type:
                    log("target reached on the eval set; stopping Stage B")
                    st["stage"], st["target_reached"] = "done", True
            if st["step"] % cfg.save_every == 0 or st["stage"] == "done" or over_time:
                save()
            if over_time:
                log("Stage B time limit reached")
                break
    st["stage"] = "done" if st["step"] >= cfg.steps_b else st["stage"]
    save()
    summary = {"config": cfg.to_dict(), "history": st["history"], "best": st["best"],
               "train_wall_s": round(st["wall"], 1), "machine": machine(),
               "data_version": DATA_VERSION, "eval_majority": majority_baseline(eval_set),
               "question_types": list(QUESTION_TYPES)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return model


def export(model, processor, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """save_pretrained model (safetensors, `dtype`) and processor into one directory."""
    import copy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(dtype)
    m.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)


def machine() -> str:
    """Short description of where training ran."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
           f"threads {torch.get_num_threads()}"
