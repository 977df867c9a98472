"""Tensors and samples of the v3 benchmark: vocabulary, processor, dense patch targets, packed questions,
balanced held-out sets per split. Same layouts as `data.py` (v2), so the trainer and `evaluate` take both."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .data import Packing, pixels
from .questions import Question
from .questions_v3 import (
    ANSWERS,
    COUNT_CHANNELS,
    QUESTION_TYPES,
    answer_vocabulary,
    candidates,
    count_phrase_end,
    exist_matches,
    fetched_objects,
    name_ends,
    names_second,
    question_words,
    sample_questions,
)
from .scenes import GRID, IMAGE_SIZE
from .scenes_v3 import (
    DIGIT_ID,
    _render,
    digit_centres,
    id_map,
    informative_patches,
    key_patches,
    object_centres,
    object_groups,
    object_marks,
    object_share,
    patch_coverage,
    patch_labels,
)
from .splits import Split, train_split
from .tokenizer import NUM_IMAGE_TOKENS, SPECIAL_TOKENS, TEMPLATE_WORDS


@lru_cache(maxsize=1)
def _vocab() -> tuple[tuple[str, int], ...]:
    words = list(SPECIAL_TOKENS) + list(TEMPLATE_WORDS)
    for w in (*question_words(), *answer_vocabulary()):
        if w not in words:
            words.append(w)
    return tuple((w, i) for i, w in enumerate(words))


def vocabulary() -> dict[str, int]:
    """v3 word -> id; the special tokens keep v2's ids (pad 0, <s> 1, </s> 2, <unk> 3, <image> 4)."""
    return dict(_vocab())


def build_processor():
    """The v3 `LlavaProcessor` (336 px, patch 14, one `<image>` -> 576 placeholders, v3 vocabulary)."""
    from .tokenizer import build_processor as build

    return build(vocabulary())


def build_model(size=None, seed: int = 0):
    """A fresh v3 model (default size `model.V3`, the >= 12-layer decoder) with the v3 vocabulary."""
    from .model import V3
    from .model import build_model as build

    return build(size or V3, seed=seed, vocab=vocabulary())


def _as_split(split: Split | int) -> Split:
    return split if isinstance(split, Split) else train_split(int(split))


def render_with_targets(scene, image: bool = True) -> tuple:
    """(PIL image or None, patch_labels dict, informative [576] bool) from one rendering of `scene`
    (`image=False`: only the id map is drawn, for the targets)."""
    image, ids = _render(scene, image)
    return image, patch_labels(scene, ids), informative_patches(scene, ids)


def token_priority(scene, labels: dict, informative: np.ndarray) -> np.ndarray:
    """[576] float32: 2 for key patches (`scenes_v3.key_patches`: object centres, digit ink), 1 for other
    informative patches, 0 for background; the order in which `train.shorten` keeps tokens."""
    return np.where(key_patches(scene, labels["digit"]), 2.0, informative.astype(np.float32)).astype(np.float32)


def dense_batch(split: Split | int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes start..start+n-1 of `split` (an int: the train split of that seed): pixels [n, 3, 336, 336],
    per-patch targets colour / shape / digit [n, 576] and xy [n, 576, 2] (the layout of `data.dense_batch`)."""
    split = _as_split(split)
    images, labels = [], []
    for i in range(n):
        image, lab, _ = render_with_targets(split.scene(start + i))
        images.append(image)
        labels.append(lab)
    out = {k: torch.from_numpy(np.stack([lab[k].reshape(-1) for lab in labels])) for k in labels[0]}
    out["xy"] = _cell_xy().expand(n, -1, -1)
    return pixels(images), out


def _cell_xy() -> torch.Tensor:
    """[1, 576, 2] float32: each patch's (column, row) / (GRID - 1), Stage A's xy target."""
    rr, cc = np.mgrid[0:GRID, 0:GRID].astype(np.float32) / (GRID - 1)
    return torch.from_numpy(np.stack([cc.reshape(-1), rr.reshape(-1)], -1))[None]


def scene_pixels(split: Split | int, indices: list[int]) -> torch.Tensor:
    """CLIP-normalised pixels [len(indices), 3, 336, 336] of scenes `indices` of `split`."""
    split = _as_split(split)
    return pixels([render_with_targets(split.scene(i))[0] for i in indices])


def encode_conversation(questions: list[Question], packing: Packing) -> tuple[list[int], list[int]]:
    """Ids and labels of `<s> USER: <image>*576 q1 ASSISTANT: a1 </s> USER: q2 ...` in the v3 vocabulary (labels
    -100 except answers and their eos), right-padded to `packing.length` (`data.encode_conversation`'s layout)."""
    v = vocabulary()
    ids = [v["<s>"], v["user"], v[":"]] + [v["<image>"]] * NUM_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for i, q in enumerate(questions):
        head = ([] if i == 0 else [v["user"], v[":"]]) + [v[w] for w in q.text.split()] + [v["assistant"], v[":"]]
        ids += head + [v[q.answer], v["</s>"]]
        labels += [-100] * len(head) + [v[q.answer], v["</s>"]]
    if len(ids) > packing.length:
        raise ValueError(f"conversation of {len(ids)} tokens exceeds packing length {packing.length}")
    pad = packing.length - len(ids)
    return ids + [v["<pad>"]] * pad, labels + [-100] * pad


def question_batch(split: Split | int, start: int, n: int, packing: Packing, indices: list[int] | None = None,
                   salt: int = 0, with_pixels: bool = True,
                   types: tuple[str, ...] = QUESTION_TYPES, with_counts: bool = False,
                   with_dense: bool = False, with_fetch_cover: bool = False,
                   centre_spread: float = 0.0, count_marks: tuple[str, ...] = ("centre",)
                   ) -> dict[str, torch.Tensor]:
    """Scenes start..start+n-1 (or `indices`) of `split` with packed balanced questions: pixel_values,
    input_ids, labels, attention_mask, informative [n, 576] (same keys as `data.question_batch`), and priority
    [n, 576] float (2: an object's centre patch or digit ink, 1: other informative patches, 0: background), the
    order in which `train.shorten` keeps tokens, fetch [n, questions_per_image, 4] (`fetch_targets`) and
    second_named [n, questions_per_image] bool (`questions_v3.names_second`; False for unused slots), name_offsets
    [n, questions_per_image, 2] int64 (`name_offsets`: where the named objects' last words are);
    `with_fetch_cover` adds fetch_cover [n, questions_per_image, 3, 576] (`fetch_cover`, about 3 ms per scene with
    a question naming an object) and fetch_sink [n, questions_per_image] bool (`fetch_sink`), the fetch attention's
    targets;
    `with_counts` adds share [n, 576, C + S] (`scenes_v3.object_share`, about 3 ms per scene), centre [n, 576, C + S]
    (`scenes_v3.object_centres` with `centre_spread`; other `count_marks`: [n, 576, M (C + S)],
    `scenes_v3.object_marks`), groups [n, 576, C + S] uint8 (`scenes_v3.object_groups`),
    count, count_channel and count_offsets [n, questions_per_image] (`count_targets`, `count_channels`,
    `count_offsets`), the count read-outs' targets;
    `with_dense` adds Stage A's per-patch targets of the same scenes, dense_colour / dense_shape / dense_digit /
    dense_place [n, 576] int64 and dense_xy [n, 576, 2] (`dense_batch`'s layout), for a Stage B that trains the tower
    (`TrainConfig.tower_lr_b`)."""
    if centre_spread > 0 and tuple(count_marks) != ("centre",):
        raise ValueError(f"centre_spread spreads the centre mark only: count_marks must be ('centre',), got "
                         f"{tuple(count_marks)}")
    split = _as_split(split)
    ids, labs, images, informative, priority, fetch, second_named, offsets = [], [], [], [], [], [], [], []
    share, centre, count, channel, count_at, dense, cover, sink = [], [], [], [], [], [], [], []
    groups = []
    indices = list(range(start, start + n)) if indices is None else list(indices)
    for index in indices:
        scene = split.scene(index)
        rng = np.random.default_rng([split.code, split.seed, index, 31337] + ([salt] if salt else []))
        qs: dict[str, Question] = {}
        for _ in range(8):  # distinct questions only
            for q in sample_questions(scene, rng, types):
                qs.setdefault(q.text, q)
            if len(qs) >= packing.questions_per_image:
                break
        asked = list(qs.values())[: packing.questions_per_image]
        a, b = encode_conversation(asked, packing)
        fetch.append(fetch_targets(scene, asked, packing.questions_per_image))
        second_named.append([names_second(q) for q in asked] + [False] * (packing.questions_per_image - len(asked)))
        offsets.append(name_offsets(asked, packing.questions_per_image))
        if with_fetch_cover:
            cover.append(fetch_cover(scene, asked, packing.questions_per_image))
            sink.append(fetch_sink(asked, packing.questions_per_image))
        if with_counts:
            count.append(count_targets(asked, packing.questions_per_image))
            channel.append(count_channels(asked, packing.questions_per_image))
            count_at.append(count_offsets(asked, packing.questions_per_image))
            drawn = id_map(scene)
            share.append(object_share(scene, drawn))
            centre.append(object_centres(scene, centre_spread) if centre_spread > 0
                          else object_marks(scene, tuple(count_marks), drawn))
            groups.append(object_groups(scene, drawn))
        ids.append(a)
        labs.append(b)
        image, lab, inf = render_with_targets(scene, with_pixels)
        if with_pixels:
            images.append(image)
        informative.append(inf)
        priority.append(token_priority(scene, lab, inf))
        if with_dense:
            dense.append(lab)
    input_ids = torch.tensor(ids)
    out = {"pixel_values": pixels(images)} if with_pixels else {}
    if with_counts:
        out |= {"share": torch.from_numpy(np.stack(share)), "centre": torch.from_numpy(np.stack(centre)),
                "groups": torch.from_numpy(np.stack(groups)),
                "count": torch.from_numpy(np.stack(count)), "count_channel": torch.from_numpy(np.stack(channel)),
                "count_offsets": torch.from_numpy(np.stack(count_at))}
    if with_fetch_cover:
        out["fetch_cover"] = torch.from_numpy(np.stack(cover))
        out["fetch_sink"] = torch.from_numpy(np.stack(sink))
    if with_dense:
        out |= {f"dense_{k}": torch.from_numpy(np.stack([lab[k].reshape(-1) for lab in dense])).long()
                for k in ("colour", "shape", "digit", "place")}
        out["dense_xy"] = _cell_xy().expand(len(dense), -1, -1)
    return {**out, "input_ids": input_ids, "labels": torch.tensor(labs),
            "attention_mask": (input_ids != vocabulary()["<pad>"]).long(),
            "informative": torch.from_numpy(np.stack(informative)),
            "priority": torch.from_numpy(np.stack(priority)),
            "fetch": torch.from_numpy(np.stack(fetch)), "second_named": torch.tensor(second_named),
            "name_offsets": torch.from_numpy(np.stack(offsets))}


def name_offsets(questions: list[Question], slots: int) -> np.ndarray:
    """[slots, 2] int64: per asked question (in order), the position of its first named object's last word and of
    its named second object's (`questions_v3.name_ends`) relative to its answer position (the ':' after 'assistant',
    `answer_readout.answer_positions`; `encode_conversation`'s layout puts the question's words just before
    'assistant :'), so negative; 0 where the question names no such object and for unused slots."""
    out = np.zeros((slots, 2), np.int64)
    for k, q in enumerate(questions[:slots]):
        for m, end in enumerate(name_ends(q)):
            out[k, m] = _from_answer(q, end)
    return out


def _from_answer(question: Question, word: int) -> int:
    """Position of the question's word `word` relative to its answer position (the question's words end just before
    'assistant :'); 0 for word -1 (none)."""
    return word - (len(question.text.split()) + 1) if word >= 0 else 0


def count_offsets(questions: list[Question], slots: int) -> np.ndarray:
    """[slots] int64: per asked question (in order), the position of a count question's counted phrase's last word
    (`questions_v3.count_phrase_end`) relative to its answer position, as `name_offsets`; 0 for other types and
    unused slots."""
    out = np.zeros(slots, np.int64)
    for k, q in enumerate(questions[:slots]):
        out[k] = _from_answer(q, count_phrase_end(q))
    return out


def fetch_cover(scene, questions: list[Question], slots: int) -> np.ndarray:
    """[slots, 3, 576] float32: per asked question (in order), the pixel share of its named object in each patch
    ([:, 0]; `questions_v3.fetched_objects`' first: colour, shape, relation, leftof, side, upper), of its second
    object where the question names that too ([:, 1]; `questions_v3.names_second`: a relation's) and of a leftof
    question's left neighbour (the object whose colour is asked; [:, 2]); for a number
    question the ink of its tens digit ([:, 0]) and of its units digit ([:, 1]); for an exist question the asked
    objects where the answer is yes ([:, 0]; where it is no, `fetch_sink`); each nonzero row sums to 1; zero
    where a question has no such object, for unused slots and for an object with no visible pixel.
    The targets of the training-only fetch attention (`fetch_attention.py`)."""
    out = np.zeros((slots, 3, 576), np.float32)
    cov = None
    for k, q in enumerate(questions[:slots]):
        if q.type == "exist":  # the asked objects where present (else `fetch_sink`)
            matches = exist_matches(scene, q)
            if matches:
                cov = patch_coverage(id_map(scene)) if cov is None else cov
                pixels = cov[:, [i + 1 for i in matches]].sum(1).astype(np.float32)
                out[k, 0] = pixels / max(pixels.sum(), 1.0)
            continue
        if q.type == "number":  # tens and units: two heads, so that the digits' order is kept
            cov = patch_coverage(id_map(scene)) if cov is None else cov
            ink = cov[:, DIGIT_ID:DIGIT_ID + 2].T.astype(np.float32)  # [2, 576]
            out[k, :2] = ink / np.maximum(ink.sum(-1, keepdims=True), 1.0)
            continue
        first, second = fetched_objects(scene, q)
        named_second = second if names_second(q) else None
        for m, obj in enumerate((first, named_second, second if q.type == "leftof" else None)):
            if obj is None:
                continue
            cov = patch_coverage(id_map(scene)) if cov is None else cov  # [576, 256]: drawn once per scene
            pixels = cov[:, obj + 1].astype(np.float32)  # id i + 1 is object i
            if pixels.sum() > 0:
                out[k, m] = pixels / pixels.sum()
    return out


def fetch_sink(questions: list[Question], slots: int) -> np.ndarray:
    """[slots] bool: the questions whose fetch attention target is `<s>` (the row's first token) instead of patches:
    an exist question whose object is absent (nothing to fetch; a head that finds no match rests on `<s>`)."""
    out = np.zeros(slots, bool)
    for k, q in enumerate(questions[:slots]):
        out[k] = q.type == "exist" and q.answer == "no"
    return out


def fetch_targets(scene, questions: list[Question], slots: int) -> np.ndarray:
    """[slots, 4] float32: per asked question (in order), the centre (x, y) of the object it names and of its second
    object (`questions_v3.fetched_objects`), for a number question the centres of its tens and units digit
    (`scenes_v3.digit_centres`), scaled to [-1, 1]; NaN where a question has no such object or the slot is unused.
    The targets of the training-only answer-position read-out (`answer_readout.py`)."""
    out = np.full((slots, 4), np.nan, np.float32)
    for k, q in enumerate(questions[:slots]):
        if q.type == "number":  # the two digits' centres: tens, units
            (tx, ty), (ux, uy) = digit_centres(scene)
            out[k] = np.asarray([tx, ty, ux, uy], np.float32) * (2 / IMAGE_SIZE) - 1
            continue
        for m, i in enumerate(fetched_objects(scene, q)):
            if i is not None:
                o = scene.objects[i]
                out[k, 2 * m: 2 * m + 2] = (2 * o.cx / IMAGE_SIZE - 1, 2 * o.cy / IMAGE_SIZE - 1)
    return out


def count_targets(questions: list[Question], slots: int) -> np.ndarray:
    """[slots] float32: per asked question (in order), the count a count question asks for; NaN for other types and
    unused slots. The answer-position target of the training-only count read-out (`count_readout.py`)."""
    out = np.full(slots, np.nan, np.float32)
    for k, q in enumerate(questions[:slots]):
        if q.type == "count":
            out[k] = float(q.answer)
    return out


def count_channels(questions: list[Question], slots: int) -> np.ndarray:
    """[slots] int64: per asked question (in order), the `scenes_v3.object_centres` column a count question counts
    (colours first, then shapes); -1 for other types and unused slots. The key tokens of the training-only count
    attention target (`count_attention.py`)."""
    out = np.full(slots, -1, np.int64)
    for k, q in enumerate(questions[:slots]):
        if q.type == "count":
            out[k] = COUNT_CHANNELS[q.text]
    return out


def balanced_samples(split: Split, n_per_type: int, types: tuple[str, ...] | None = None,
                     max_scenes: int = 200_000) -> list[dict]:
    """Questions of `split` with (near-)uniform answers per type: dicts id / image / question / answer / type /
    scene / split. Each scene gives at most one question per type; images are shared within a scene."""
    if not isinstance(split, Split):
        raise TypeError(f"balanced_samples needs a Split, got {type(split).__name__}")
    types = tuple(types or QUESTION_TYPES)
    quota = {t: {a: -(-n_per_type // len(ANSWERS[t])) for a in ANSWERS[t]} for t in types}
    total = dict.fromkeys(types, 0)
    out: list[dict] = []
    index = 0
    while any(total[t] < n_per_type for t in types):
        if index >= max_scenes:
            raise RuntimeError(f"could not fill {n_per_type} questions per type from {max_scenes} scenes")
        scene = split.scene(index)
        rng = np.random.default_rng([split.code, split.seed, index, 4241])
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
            image = image or _render(scene)[0]
            out.append({"id": f"v3-{split.name}-{split.seed}-{index:06d}-{t}", "image": image, "question": q.text,
                        "answer": q.answer, "type": t, "scene": scene, "split": str(split)})
        index += 1
    return out
