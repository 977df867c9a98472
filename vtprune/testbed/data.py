"""Tensors for training and scoring: pixel batches, dense patch targets, packed multi-question prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .questions import QUESTION_TYPES, Question, candidates, sample_questions
from .scenes import GRID, make_scene, patch_labels, render
from .tokenizer import CLIP_MEAN, CLIP_STD, NUM_IMAGE_TOKENS, vocabulary

# Data streams: Stage A uses scenes of seed `s`, Stage B of seed `s + 1` (s = training seed, < 10_000);
# the eval set watched during training and the held-out set of the model card / tests are disjoint.
EVAL_SEED = 10_001
HELDOUT_SEED = 10_002

_MEAN = np.asarray(CLIP_MEAN, np.float32)
_STD = np.asarray(CLIP_STD, np.float32)


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """CLIP-normalised pixels [B, 3, 336, 336] (same numbers as the processor for 336-px inputs)."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    arr = (arr - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def dense_batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes start..start+n-1: pixels [n, 3, 336, 336] and per-patch targets [n, 576] plus xy [n, 576, 2]."""
    scenes = [make_scene(seed, start + i) for i in range(n)]
    labels = [patch_labels(s) for s in scenes]
    out = {k: torch.from_numpy(np.stack([lab[k].reshape(-1) for lab in labels])) for k in labels[0]}
    rr, cc = np.mgrid[0:GRID, 0:GRID].astype(np.float32) / (GRID - 1)
    xy = torch.from_numpy(np.stack([cc.reshape(-1), rr.reshape(-1)], -1))
    out["xy"] = xy.expand(n, -1, -1)
    return pixels([render(s) for s in scenes]), out


@dataclass
class Packing:
    """Fixed-length layout for several questions about one image."""

    questions_per_image: int = 6
    length: int = 0  # 0: computed from the longest possible question

    def __post_init__(self) -> None:
        if self.length == 0:
            per_turn = 2 + 13 + 2 + 2  # "user :" + longest question + "assistant :" + answer + eos
            self.length = 3 + NUM_IMAGE_TOKENS + self.questions_per_image * per_turn


def encode_conversation(questions: list[Question], packing: Packing) -> tuple[list[int], list[int]]:
    """Token ids and labels for `<s> USER: <image>*576 q1 ASSISTANT: a1 </s> USER: q2 ...`.

    The first turn is exactly the single-question inference prompt. Labels are -100 except on
    answers and their eos. Right-padded with <pad> to `packing.length`.
    """
    v = vocabulary()
    ids = [v["<s>"], v["user"], v[":"]] + [v["<image>"]] * NUM_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for i, q in enumerate(questions):
        turn = [] if i == 0 else [v["user"], v[":"]]
        head = turn + [v[w] for w in q.text.split()] + [v["assistant"], v[":"]]
        ids += head + [v[q.answer], v["</s>"]]
        labels += [-100] * len(head) + [v[q.answer], v["</s>"]]
    if len(ids) > packing.length:
        raise ValueError(f"conversation of {len(ids)} tokens exceeds packing length {packing.length}")
    pad = packing.length - len(ids)
    return ids + [v["<pad>"]] * pad, labels + [-100] * pad


def question_batch(seed: int, start: int, n: int, packing: Packing, indices: list[int] | None = None,
                   salt: int = 0, with_pixels: bool = True,
                   types: tuple[str, ...] = QUESTION_TYPES) -> dict[str, torch.Tensor]:
    """Scenes start..start+n-1 (or the scene `indices`) with packed balanced questions: pixel_values,
    input_ids, labels, mask, and `informative` [n, 576] (bool: the patch holds an object or the digit box).

    `salt` != 0 draws other questions about the same scenes (a feature cache cycles over its scenes with
    salt = pass number); `with_pixels=False` skips rendering (features come from a cache); `types`
    restricts the question types (Stage B's type curriculum).
    """
    ids, labs, images, informative = [], [], [], []
    indices = list(range(start, start + n)) if indices is None else list(indices)
    for index in indices:
        scene = make_scene(seed, index)
        rng = np.random.default_rng([seed, index, 31337] + ([salt] if salt else []))
        qs: dict[str, Question] = {}
        for _ in range(8):  # distinct questions only: a repeated question could copy an earlier answer
            for q in sample_questions(scene, rng, types):
                qs.setdefault(q.text, q)
            if len(qs) >= packing.questions_per_image:
                break
        a, b = encode_conversation(list(qs.values())[: packing.questions_per_image], packing)
        ids.append(a)
        labs.append(b)
        if with_pixels:
            images.append(render(scene))
        lab = patch_labels(scene)
        informative.append(((lab["colour"] > 0) | (lab["digit"] > 0)).reshape(-1))
    input_ids = torch.tensor(ids)
    out = {"pixel_values": pixels(images)} if with_pixels else {}
    return {**out, "input_ids": input_ids, "labels": torch.tensor(labs),
            "attention_mask": (input_ids != vocabulary()["<pad>"]).long(),
            "informative": torch.from_numpy(np.stack(informative))}


def balanced_samples(seed: int, n_per_type: int, types: tuple[str, ...] = QUESTION_TYPES,
                     id_prefix: str = "shapes") -> list[dict]:
    """Held-out questions with (near-)uniform answers per type: dicts id/image/question/answer/type/scene.

    Each scene contributes at most one question per type; `image` is a PIL image shared by the
    questions of the same scene.
    """
    from .questions import ANSWERS

    quota = {t: {a: -(-n_per_type // len(ANSWERS[t])) for a in ANSWERS[t]} for t in types}
    total = {t: 0 for t in types}
    out: list[dict] = []
    index = 0
    while any(total[t] < n_per_type for t in types):
        scene = make_scene(seed, index)
        rng = np.random.default_rng([seed, index, 4241])
        image = None
        for t in types:
            if total[t] >= n_per_type:
                continue
            cands = [q for q in candidates(scene, t) if quota[t][q.answer] > 0]
            if not cands:
                continue
            q = cands[int(rng.integers(len(cands)))]
            quota[t][q.answer] -= 1
            total[t] += 1
            image = image or render(scene)
            out.append({"id": f"{id_prefix}-{seed}-{index:06d}-{t}", "image": image, "question": q.text,
                        "answer": q.answer, "type": t, "scene": scene})
        index += 1
    return out
