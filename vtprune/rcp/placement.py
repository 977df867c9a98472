"""Where RCP's plug-ins sit: pruning layers, repair (DRA) layers and the DRA source map (spec rcp.md table).

Spec table (32-layer LLaVA-1.5 / LLaVA-NeXT; Qwen2.5-VL's 28 layers by `round_half_up(ℓ·28/32)`):

| ratio ρ = K/N | pruning layers | repair layers (source) |
|---|---|---|
| 1/3, 2/9 (192 / 128 of 576) | 4, 14, 24 | 22 (←14), 29 (←24) |
| 1/9 (64 of 576) | 1, 13, 25 | 22 (←13), 29 (←25) |

Our decision, for every depth L (it reproduces both spec tables exactly, L = 32 and L = 28):

1. Base layers are the 32-layer ones above; the "early" set (1, 13, 25) is used for ρ ≤ 1/6 (the 64-token
   column and every smaller budget, e.g. LLaVA-NeXT 320 and 160 of 2880), the "late" set (4, 14, 24) above.
2. Each base layer ℓ maps to `round_half_up(ℓ·L/32)`.
3. The pruning layers must come out strictly increasing and inside [0, L−1]; otherwise the model is too
   shallow (L < 3) and placement is refused with `UnsupportedModelError`.
4. Repair layers are clamped to L−1; two that land on the same layer become one DRA (e.g. the built-in
   3-layer model gets a single DRA after layer 2). A repair layer's source is the latest pruning layer
   ≤ it (this is also what the spec's explicit map says for every listed model).

Examples: L = 32, ρ = 1/9 → prune (1, 13, 25), repair (22, 29), source {22: 13, 29: 25};
L = 6 → prune (0, 2, 5), repair (4, 5), source {4: 2, 5: 5}; L = 3 → prune (0, 1, 2), repair (2,), {2: 2}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedModelError

BASE_LAYERS = 32
EARLY_PRUNING = (1, 13, 25)  # ρ ≤ 1/6
LATE_PRUNING = (4, 14, 24)  # ρ > 1/6
BASE_REPAIR = (22, 29)
EARLY_MAX_RATIO = 1.0 / 6.0


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (2.5 -> 3), with a little slack for float error."""
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class Placement:
    """Layers of one RCP configuration (0-based decoder-layer indices).

    pruning_layers: a pruner acts at the *input* of each (layer ℓ already runs without the dropped tokens);
    repair_layers: a DRA is applied to the *output* of each; source: repair layer -> pruning layer whose
    context vectors it uses.
    """

    num_layers: int
    pruning_layers: tuple[int, ...]
    repair_layers: tuple[int, ...]
    source: tuple[tuple[int, int], ...]

    @property
    def source_map(self) -> dict[int, int]:
        return dict(self.source)

    def segment_lengths(self) -> list[int]:
        """n_k: layers from pruning layer k to the next one (or L), as in the sparsity loss."""
        ends = list(self.pruning_layers[1:]) + [self.num_layers]
        return [e - s for s, e in zip(self.pruning_layers, ends, strict=True)]

    def layer_average(self, ratios) -> float:
        """r̄ = (ℓ_1 + Σ_k n_k r_k) / L for kept fractions r_k after each pruner (floats or tensors)."""
        total = float(self.pruning_layers[0])
        for n, r in zip(self.segment_lengths(), ratios, strict=True):
            total = total + n * r
        return total / self.num_layers

    def min_layer_average_tokens(self, n_visual: int) -> float:
        """Smallest reachable layer-averaged count for N visual tokens (every pruner keeps one token)."""
        return (self.pruning_layers[0] * n_visual + (self.num_layers - self.pruning_layers[0])) / self.num_layers

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "pruning_layers": list(self.pruning_layers),
            "repair_layers": list(self.repair_layers),
            "source_map": {str(r): s for r, s in self.source},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        src = tuple(sorted((int(r), int(s)) for r, s in d["source_map"].items()))
        return cls(int(d["num_layers"]), tuple(d["pruning_layers"]), tuple(d["repair_layers"]), src)


def placement_for(num_layers: int, ratio: float) -> Placement:
    """Placement for an L-layer decoder and a target kept ratio ρ = K/N (see the module docstring)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    base = EARLY_PRUNING if ratio <= EARLY_MAX_RATIO + 1e-12 else LATE_PRUNING
    L = int(num_layers)
    prune = [round_half_up(ell * L / BASE_LAYERS) for ell in base]
    if any(b <= a for a, b in zip(prune, prune[1:], strict=False)) or prune[-1] > L - 1 or prune[0] < 0:
        raise UnsupportedModelError(
            f"RCP needs three distinct pruning layers; a {L}-layer decoder gives {prune} from the rule "
            f"round_half_up(ℓ·L/32) on {base} (at least 3 decoder layers are needed)"
        )
    repair: list[int] = []
    for r in BASE_REPAIR:
        layer = min(round_half_up(r * L / BASE_LAYERS), L - 1)
        if layer not in repair:
            repair.append(layer)
    source = []
    for r in repair:
        earlier = [p for p in prune if p <= r]
        if not earlier:
            raise UnsupportedModelError(f"repair layer {r} comes before the first pruning layer {prune[0]}")
        source.append((r, earlier[-1]))
    return Placement(L, tuple(prune), tuple(repair), tuple(source))
