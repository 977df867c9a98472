"""Text signals: the question span of each sample and what a method reads from it (spec README §3).

The question span of a sample is every valid input row after its last image (up to the last prompt row in an
uncached replay); `QuestionReader.read` returns those rows per sample and gives each image of the sample the text
signals its method asked for (`suffix_embeddings`, `question_embeddings`, `noun_embeddings`, `question_text`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VtpruneError
from ..models.base import ModelAdapter
from ..text import question_nouns, strip_generation_header
from .state import ImageState

_NEEDS_TOKENIZER = frozenset({"noun_embeddings", "question_text"})


class QuestionReader:
    """Reads each sample's question span with the model's input embeddings (and the tokenizer when needed)."""

    def __init__(
        self, *, model: nn.Module, adapter: ModelAdapter, method_name: str, wanted: frozenset[str], tokenizer=None
    ) -> None:
        self._model, self._adapter = model, adapter
        self._method_name = method_name
        self.wanted = wanted  # the text signals the method asks for at any stage
        self._tokenizer = tokenizer
        if wanted & _NEEDS_TOKENIZER:
            _ = self.tokenizer  # fail at apply time when no tokenizer can be found

    @property
    def tokenizer(self):
        """The tokenizer given to `apply`, else one loaded from the model's local directory (no download)."""
        if self._tokenizer is None:
            model = self._model
            path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as err:
                raise VtpruneError(
                    f"method {self._method_name!r} needs the tokenizer to read the question (signals "
                    f"{sorted(self.wanted & _NEEDS_TOKENIZER)}); none was found at "
                    f"{path!r}: pass vtprune.apply(..., tokenizer=processor.tokenizer)"
                ) from err
        return getattr(self._tokenizer, "tokenizer", self._tokenizer)  # a processor is accepted too

    def read(
        self,
        *,
        input_ids: torch.Tensor,
        mask2d: torch.Tensor,
        images: list[ImageState],
        generation_start: int | None,
    ) -> list[torch.Tensor]:
        """Question-span rows and text signals per sample, shared by the sample's images.

        input_ids, mask2d (B, L); generation_start: in an uncached replay of prompt + generated ids, the last
        prompt row (the span ends there), else None. -> per sample the span's input rows (T_s,) int64; each image
        gets the wanted signals in `signals` (and `question`)."""
        wanted = self.wanted
        embed = self._model.get_input_embeddings()
        special = torch.tensor(sorted(self._special_ids()), dtype=torch.long, device=input_ids.device)
        tok = self.tokenizer if (wanted & _NEEDS_TOKENIZER or self._tokenizer is not None) else None
        suffix_rows: list[torch.Tensor] = []
        for b in range(input_ids.shape[0]):
            mine = [im for im in images if im.sample == b]
            valid = mask2d[b].bool().nonzero().flatten()
            start = int(mine[-1].span[-1]) + 1 if mine else int(valid[0])
            rows = valid[valid >= start]
            if generation_start is not None:  # prompt + generated ids: the span ends at the last prompt row
                rows = rows[rows <= generation_start]
            suffix_rows.append(rows)
            if not mine:
                continue
            ids = input_ids[b, rows]
            q_ids = ids[~torch.isin(ids, special)]
            if tok is not None and q_ids.numel():
                keep = strip_generation_header([tok.decode([int(i)]) for i in q_ids.tolist()])
                q_ids = q_ids[:keep]
            out: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                if "suffix_embeddings" in wanted:
                    out["suffix_embeddings"] = embed(ids).float()
                if "question_embeddings" in wanted:
                    out["question_embeddings"] = embed(q_ids).float()
                question = tok.decode(q_ids.tolist(), skip_special_tokens=True).strip() if tok is not None else None
                if "noun_embeddings" in wanted:
                    out["noun_embeddings"] = _noun_embeddings(embed, tok, question, ids.device)
            for im in mine:
                im.signals.update(out)
                im.question = question if "question_text" in wanted else None
        return suffix_rows

    def _special_ids(self) -> set[int]:
        cfg, tc = self._model.config, self._adapter.text_config
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids = {int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)}
        for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(tc, n, None)
            ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
        if self._tokenizer is not None:
            ids.update(int(i) for i in self.tokenizer.all_special_ids)
        return ids


def _noun_embeddings(embed: nn.Module, tok, question: str | None, device: torch.device) -> torch.Tensor:
    """(m, D) fp32: the mean input embedding of each noun's sub-tokens (nouns of `question`, `text.question_nouns`)."""
    rows = []
    for noun in question_nouns(question or ""):
        sub = tok(" " + noun, add_special_tokens=False)["input_ids"]
        if sub:
            rows.append(embed(torch.tensor(sub, device=device)).float().mean(0))
    width = embed.weight.shape[1]
    return torch.stack(rows) if rows else torch.zeros(0, width, device=device)
