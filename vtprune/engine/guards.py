"""Input and concurrency guards of a pruning session (small, model-agnostic checks called by `session.py`).

- `refuse_right_padding`: in-LLM stages compact kept rows with left padding and read "the last prompt
  token" at the last column; a right-padded (or holed) attention mask would silently change their
  selections, so such batches are refused (pre-LLM methods handle any padding and are not affected).
- `ThreadGuard`: a session keeps per-call state (the current forward, captured vision signals, generate
  kwargs), so one patched model cannot run two calls at once. A call that enters while another thread is
  inside a forward or `generate` of the same patched model is refused with a clear error; calls from one
  thread (nested, or one after another from different threads) work as before.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..errors import UnsupportedInputError


def refuse_right_padding(mask2d: torch.Tensor) -> None:
    """Raise `UnsupportedInputError` unless every row of the (B, L) 0/1 mask is left-padded (0…0 1…1)."""
    m = mask2d.long()
    if m.shape[-1] < 2:
        return
    bad = (m[:, 1:] < m[:, :-1]).any(1)  # a 1 followed by a 0: padding (or a hole) after the tokens
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise UnsupportedInputError(
            f"in-LLM pruning needs left-padded batches, but sample(s) {rows[:8]} have padding after their tokens "
            "(right padding); set tokenizer.padding_side = 'left' (processor.tokenizer.padding_side = 'left')"
        )


class ThreadGuard:
    """Refuses a second thread while one thread is inside a guarded call; re-entrant for the owner thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def enter(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me) and not any(t.ident == self._owner for t in threading.enumerate()):
                self._owner, self._depth = None, 0  # the owner thread died inside a call
            if self._owner not in (None, me):
                raise UnsupportedInputError(
                    "this vtprune-patched model is already running a forward/generate in another thread; a pruning "
                    "session holds per-call state, so use one patched model per thread (e.g. copy.deepcopy(model) "
                    "before vtprune.apply) or serialise the calls with a lock"
                )
            self._owner, self._depth = me, self._depth + 1

    def exit(self) -> None:
        with self._lock:
            if self._owner == threading.get_ident():
                self._depth -= 1
                if self._depth <= 0:
                    self._owner, self._depth = None, 0

    def pre_hook(self, module, args, kwargs) -> None:
        self.enter()

    def post_hook(self, module, args, kwargs, output=None) -> None:
        self.exit()

    def __deepcopy__(self, memo) -> ThreadGuard:
        """A deep-copied patched model gets its own guard (the copy may run in another thread)."""
        return ThreadGuard()


class _Guarded:
    """`fn` run inside the guard (the instance `generate`); an object, not a closure, so that `copy.deepcopy`
    of a patched model gives the copy its own guard and its own session's `generate`."""

    def __init__(self, guard: ThreadGuard, fn) -> None:
        self.guard, self.fn = guard, fn

    def __call__(self, *args, **kwargs):
        g = self.guard
        g.enter()
        depth = g._depth
        try:
            return self.fn(*args, **kwargs)
        finally:
            with g._lock:  # also undoes a forward that was interrupted (KeyboardInterrupt) inside
                g._depth = depth
            g.exit()


def install_thread_guard(model: nn.Module, handles: list) -> ThreadGuard:
    """Guard a patched model: its forward (pre-hook first, a forward hook that always runs) and its instance
    `generate`. The hook handles are appended to `handles` (the session removes them)."""
    guard = ThreadGuard()
    handles.append(model.register_forward_pre_hook(guard.pre_hook, prepend=True, with_kwargs=True))
    handles.append(model.register_forward_hook(guard.post_hook, with_kwargs=True, always_call=True))
    gen = model.__dict__.get("generate")
    if gen is not None:
        model.__dict__["generate"] = _Guarded(guard, gen)
    return guard
