"""RCP training data: a JSONL file of {image, question, answer} rows -> padded teacher-forcing batches.

Format (one JSON object per line; `vtprune testbed export` writes it):

    {"image": "images/0001.png", "question": "What colour is the circle?", "answer": "red",
     "id": "shapes-0001-colour", "type": "colour"}

- `image`: path relative to the JSONL file's directory (or absolute); `question`, `answer`: strings.
- Optional: `id` (or `question_id`) names the sample (it seeds the sample's Gumbel noise, spec README §10;
  default: the line number); any other field (e.g. `type`) is kept and ignored.

Prompt: the user text is the question (plus an optional suffix, e.g. the spec's VQAv2 "\\nAnswer the question
using a single word or phrase."), wrapped in the model's chat template when its processor has one, else in
the family default (`USER: <image>\\n{question} ASSISTANT:`, the built-in testbed model's prompt), exactly as
`vtprune run` builds it (`vtprune.runner.prompt_text`). Target = the answer's tokens as they follow the prompt
(tokenised together with the prompt, then split), then EOS. Generation positions are the predicting positions
of the target tokens: with targets at [s, e), positions [s − 1, e − 1). Sequences longer than `max_length`
(spec: 1024) lose answer tokens from the end (a prompt alone longer than that is an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VtpruneError
from ..files import open_image

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass
class Example:
    """One JSONL row."""

    key: str
    image: Path
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def read_examples(path: str | Path) -> list[Example]:
    """Rows of a JSONL file; image paths resolved against the file's directory.  Any problem (not JSON, a missing
    or mistyped field, a missing or unreadable image, an empty file) raises `VtpruneError` "FILE:LINE: ..."."""
    from ..files import check_image, read_jsonl

    path = Path(path)
    root = path.parent
    required = {"image": (str,), "question": (str,), "answer": (str, int, float)}
    rows = read_jsonl(path, required, {"id": (str, int), "question_id": (str, int)})
    out = []
    for row in rows:
        line_no = row.pop("_line")
        image = Path(row["image"])
        image = image if image.is_absolute() else root / image
        check_image(image, f"{path}:{line_no}")
        key = row.get("id", row.get("question_id", line_no - 1))
        extra = {k: v for k, v in row.items() if k not in ("image", "question", "answer")}
        out.append(Example(str(key), image, str(row["question"]), str(row["answer"]), extra))
    return out


class Collator:
    """Builds left-padded teacher-forcing batches for one loaded model (`vtprune.runner.Loaded`).

    -> {input_ids (B, T), attention_mask (B, T), pixel_values, [image_sizes], prompt_end (B,) index of the
    last prompt token, targets (B, T) next-token ids at generation positions and −100 elsewhere, keys [B]}.
    """

    def __init__(self, loaded, suffix: str = "", max_length: int = 1024):
        if loaded.processor is None:
            raise VtpruneError(f"RCP training needs a LLaVA-style processor ({loaded.family} has none here)")
        self.loaded = loaded
        self.suffix = suffix
        self.max_length = max_length
        tok = loaded.tokenizer
        eos = tok.eos_token_id
        if eos is None:
            gen_eos = loaded.model.generation_config.eos_token_id
            eos = gen_eos[0] if isinstance(gen_eos, list) else gen_eos
        if eos is None:
            raise VtpruneError("the tokenizer has no EOS token; RCP targets are answer + EOS")
        self.eos = int(eos)
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)

    def prompt(self, question: str) -> str:
        from ..runner import prompt_text

        return prompt_text(self.loaded, question + self.suffix)

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """The answer's token ids as they follow `prompt`, then EOS."""
        tok = self.loaded.tokenizer
        head = tok(prompt)["input_ids"]
        both = tok(prompt + " " + answer)["input_ids"]
        if len(both) > len(head) and both[: len(head)] == head:
            ids = both[len(head) :]
        else:  # the answer merged with the prompt's last token: tokenise it alone
            ids = tok(answer, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids] + [self.eos]

    def __call__(self, examples: list[Example]) -> dict:
        prompts = [self.prompt(e.question) for e in examples]
        images = [open_image(e.image, f"sample {e.key}") for e in examples]
        enc = self.loaded.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        rows = []
        for b, e in enumerate(examples):
            valid = enc["attention_mask"][b].bool()
            prompt_ids = enc["input_ids"][b][valid].tolist()
            if len(prompt_ids) >= self.max_length:
                raise VtpruneError(
                    f"sample {e.key}: the prompt alone has {len(prompt_ids)} tokens (max {self.max_length})"
                )
            answer = self.answer_ids(prompts[b], e.answer)[: self.max_length - len(prompt_ids)]
            rows.append((prompt_ids, answer))
        width = max(len(p) + len(a) for p, a in rows)
        B = len(rows)
        ids = torch.full((B, width), self.pad, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.long)
        targets = torch.full((B, width), -100, dtype=torch.long)
        prompt_end = torch.zeros(B, dtype=torch.long)
        for b, (p, a) in enumerate(rows):
            seq = p + a
            start = width - len(seq)
            ids[b, start:] = torch.tensor(seq)
            mask[b, start:] = 1
            s = start + len(p)  # first target position
            targets[b, s - 1 : s - 1 + len(a)] = torch.tensor(a)
            prompt_end[b] = s - 1
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "targets": targets,
            "prompt_end": prompt_end,
            "keys": [e.key for e in examples],
        }
        for k in ("pixel_values", "image_sizes"):
            if k in enc:
                out[k] = enc[k]
        return out
