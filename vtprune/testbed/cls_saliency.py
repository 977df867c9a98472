"""Stage C of the testbed training: give the vision tower's [CLS] token a meaningful attention.

In CLIP the [CLS] token is trained (contrastive loss), and its attention over the patches at the
feature layer is what VisionZip, VisPruner, DCP-Prune and ViTCoP rank tokens by. Stages A and B never
train it (the decoder drops the [CLS] row), so its attention is arbitrary: on the first shipped
checkpoints it put *less* mass on the object and digit patches than a uniform attention would, and
every [CLS]-ranked method scored like random pruning.

Stage C trains the class embedding alone (one vector of the vision width; every other weight frozen) to
maximise the feature layer's head-mean [CLS]→patch attention mass on the informative patches (objects
and the digit box, from the scene graph). The target is training-only; nothing is added to the model.
The patch features move only through their attention to the [CLS] token (a mean relative change of
about 0.5 % on the shipped model), so the decoder is left as it is and the held-out accuracy is
re-measured afterwards.

The attention is the one `vtprune.models.llava.LlavaAdapter.vision_signals` hands methods at inference
(computed by it; tests/test_testbed_cls_saliency.py checks it against the engine's captured signal).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..models.llava import LlavaAdapter
from .data import dense_batch
from .features import vision_features


def _tower(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Head-mean [CLS]→patch attention of the feature layer, computed by the LLaVA adapter's own
    `vision_signals` (differentiable): [B, 3, 336, 336] -> [B, 576] fp32."""
    return cls_attention_and_features(model, pixel_values)[0]


def cls_attention_and_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`cls_attention` [B, 576], the feature layer's patch features [B, 576, Dv], i.e. `vision_features`) from one
    pass of the tower (differentiable)."""
    adapter = LlavaAdapter(model)
    layer = adapter.feature_layer()
    index = list(_tower(model).encoder.layers).index(layer)  # hidden_states[index] is the layer's input
    hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    probs = adapter.vision_signals(layer.self_attn, layer.layer_norm1(hidden[index]))["cls_attention"]
    return probs, hidden[index + 1][:, 1:]


def informative_patches(labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-patch labels of `dense_batch` -> [B, 576] bool: the patch holds an object or the digit box."""
    return (labels["colour"] > 0) | (labels["digit"] > 0)


@torch.no_grad()
def saliency_stats(model, pixel_values: torch.Tensor, informative: torch.Tensor,
                   reference: torch.Tensor | None = None, top: int = 64) -> dict[str, float]:
    """How well the [CLS] attention finds the informative patches, averaged over the images:
    `mass` (attention on them), `precision` (share of them among the |informative| top-ranked patches),
    `recall_at_{top}` (share of them among the `top` top-ranked patches) and, given the `reference` patch
    features [B, 576, Dv], `feature_drift` (mean relative L2 change of the patch features)."""
    probs = cls_attention(model, pixel_values)
    order = probs.argsort(dim=1, descending=True, stable=True)  # ties by index
    hits = informative.gather(1, order).float()  # [B, 576], informative in rank order
    n = informative.sum(1).clamp_min(1)
    ranks = torch.arange(hits.shape[1]).expand_as(hits)
    out = {"mass": (probs * informative).sum(1).mean().item(),
           "precision": ((hits * (ranks < n[:, None])).sum(1) / n).mean().item(),
           f"recall_at_{top}": (hits[:, :top].sum(1) / n).mean().item()}
    if reference is not None:
        feats = vision_features(model, pixel_values).float()
        out["feature_drift"] = ((feats - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def tune_cls_embedding(model, steps: int, lr: float = 0.05, seed: int = 3, batch: int = 8,
                       eval_seed: int = 10001, eval_n: int = 32, device: str = "cpu",
                       log: Callable[[str], None] = print, dense: Callable = dense_batch,
                       drift_weight: float = 0.0) -> dict:
    """Train `model`'s class embedding in place (fp32 math; every other weight untouched) for `steps` Adam
    steps on scenes of `seed`: loss = -log(attention mass on the informative patches), plus `drift_weight` times the
    batch's feature drift (mean relative L2 change of the patch features from those of the embedding it started
    with: the decoder reads those features, so a drift costs it accuracy). Returns
    {"before": stats, "after": stats, "steps", "lr", "wall_s"} with `saliency_stats` on `eval_n` scenes
    of `eval_seed` (`dense`: the benchmark's `dense_batch`, v2's by default)."""
    emb = _tower(model).embeddings.class_embedding
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = emb.dtype
    model.float()
    was_training = model.training
    model.eval()  # no dropout; the tower has no batch statistics
    pv_eval, lab_eval = dense(eval_seed, 0, eval_n)
    pv_eval, inf_eval = pv_eval.to(device), informative_patches(lab_eval).to(device)
    with torch.no_grad():
        reference = vision_features(model, pv_eval).float()
    before = saliency_stats(model, pv_eval, inf_eval, reference)
    start = emb.detach().clone()
    emb.requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    t0 = time.time()
    try:
        for step in range(steps):
            pv, labels = dense(seed, step * batch, batch)
            probs, feats = cls_attention_and_features(model, pv.to(device))
            mass = (probs * informative_patches(labels).to(device)).sum(1)
            loss = -torch.log(mass + 1e-6).mean()
            if drift_weight > 0:
                with torch.no_grad():  # the batch's features under the starting embedding
                    current = emb.data.clone()
                    emb.data.copy_(start)
                    ref = vision_features(model, pv.to(device)).float()
                    emb.data.copy_(current)
                loss = loss + drift_weight * ((feats.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 25 == 0:
                log(f"C {step + 1} {time.time() - t0:.0f}s [CLS] mass on informative patches {mass.mean().item():.3f}")
        wall = time.time() - t0
        emb.data = emb.data.to(dtype).float()  # score what will be saved
        after = saliency_stats(model, pv_eval, inf_eval, reference)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.to(dtype)
        model.train(was_training)
    return {"before": before, "after": after, "steps": steps, "lr": lr, "wall_s": round(wall, 1)}
