"""Rewrites of decoder-layer outputs: features the model injects after some layers, and a method's repair.

- `inject`: with in-LLM stages, the per-row features a model adds to visual rows after its
  `injection_layers` (Qwen3-VL's DeepStack) are taken out of the stock loop and re-added on the rows still present
  (rows an in-LLM stage dropped get nothing; the others exactly the stock sum).
- `repair`: `method.repair(layer, rows (R, D), memos)` per sample on its generation rows (prefill: the last prompt
  row, or every row from the forward's `generation_start` on; decode: every new row), with the memos of that
  sample's images as context; other rows stay bit-identical.
"""

from __future__ import annotations

import torch

from ..contract.method import PruningMethod
from ..models.base import ModelAdapter
from .state import ForwardState


def _rows_of(output):
    return output[0] if isinstance(output, tuple) else output


def _with_rows(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def inject(fw: ForwardState, *, idx: int, output, adapter: ModelAdapter):
    """Output of injection layer `idx` with the adapter's features added on the current group's rows."""
    x = _rows_of(output)
    first, seq = fw.groups[0].seq_index, fw.group_for(idx).seq_index  # (B, L0), (B, L') input rows
    pad = int(first.max()) + 1  # one spare column for padding rows
    inv = torch.full((first.shape[0], pad + 1), -1, dtype=torch.long, device=first.device)
    lm = torch.arange(first.shape[1], device=first.device).expand_as(first)
    inv.scatter_(1, first.masked_fill(first < 0, pad), lm.masked_fill(first < 0, -1))
    inv[:, pad] = -1
    lm_rows = inv.gather(1, seq.masked_fill(seq < 0, pad))  # (B, L') language-model input row, −1 padding
    new = adapter.inject(fw.injection, idx, x, lm_rows)
    return _with_rows(output, new)


def repair(fw: ForwardState, *, idx: int, output, method: PruningMethod):
    """Output of repair layer `idx` with the method's repair on the generation rows, or None when unchanged.
    Samples without an image are left alone."""
    x = _rows_of(output)
    if fw.prefill:
        seq = fw.group_for(idx).seq_index  # (B, L) input row of each row, −1 on padding
        if fw.generation_start is None:
            gate = (seq == seq.max(1, keepdim=True).values) & (seq >= 0)
        else:
            gate = seq >= fw.generation_start
    else:
        gate = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    new = None
    for b in range(x.shape[0]):
        memos = [im.memo for im in fw.images if im.sample == b]
        rows = gate[b].nonzero().flatten()
        if not memos or rows.numel() == 0:
            continue
        fixed = method.repair(idx, x[b, rows], memos)
        if fixed is None:
            continue
        new = x.clone() if new is None else new
        new[b, rows] = fixed.to(x.dtype)
    if new is None:
        return None
    return _with_rows(output, new)
