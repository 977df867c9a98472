"""What every `vtprune` subcommand shares: the parser class, error reporting, argument types and checks, and output.

The command modules (`vtprune.cli` and the subcommand modules `vtprune.commands.testbed`, `vtprune.commands.bench`,
`vtprune.commands.rcp`) import these from here, so no application module imports `vtprune.cli`.
Conventions are listed in `vtprune.cli`'s docstring.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vtprune.errors import VtpruneError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


USER_ERRORS: tuple[type[BaseException], ...] = (
    VtpruneError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


OUT_ROOT = "vtprune-out"


class UsageError(VtpruneError):
    """A bad command line: unknown option, missing file, malformed value."""


class ArgumentsError(SystemExit):
    """argparse's complaint about the command line (still a `SystemExit` with status 2 for callers of
    `parse_args`); `main` prints it as one line."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PartialResults(Exception):  # noqa: N818 - not an error of the user: results were written
    """Some of what was asked for could not run; the results of the rest were written."""


# --- the parser -------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as `ArgumentsError`) and optionally lazily added arguments:
    `populate(parser)` runs the first time the parser is used, so a command whose defaults need heavy
    imports (train-rcp, testbed) costs nothing in `vtprune --help`."""

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], object] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ready(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ready()
        return super().format_help()

    def format_usage(self) -> str:
        self._ready()
        return super().format_usage()

    def error(self, message: str):
        raise ArgumentsError(f"{message} (see {self.prog} --help)")


def add_lazy_parser(subparsers, name: str, populate: Callable[[argparse.ArgumentParser], object], **kwargs):
    """`subparsers.add_parser(name, **kwargs)` whose arguments `populate` adds on first use (a `Parser`
    subparsers object), or at once (any other argparse subparsers object)."""
    if issubclass(getattr(subparsers, "_parser_class", object), Parser):
        return subparsers.add_parser(name, populate=populate, **kwargs)
    parser = subparsers.add_parser(name, **kwargs)
    populate(parser)
    return parser


def one_line(err: BaseException) -> str:
    """An exception as one line: 'not found: PATH' for missing files, else its message with newlines joined."""
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"not found: {err.filename}"
    if isinstance(err, (IsADirectoryError, NotADirectoryError, PermissionError)) and err.filename:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    text = str(err) or type(err).__name__
    if isinstance(err, KeyError) and err.args:  # str(KeyError) quotes its key
        text = str(err.args[0])
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def guarded(run: Callable[[], int | None], prog: str = "vtprune", debug: bool = False) -> int:
    """Run a command: its status, 1 for partial results, 2 (one line on stderr) for a user error, 130 for ^C.
    With `debug` a user error shows its traceback too."""
    try:
        return int(run() or 0)
    except ArgumentsError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PartialResults as partial:
        print(f"{prog}: {one_line(partial)}", file=sys.stderr)
        return EXIT_PARTIAL
    except USER_ERRORS as err:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Remove `--debug` (accepted anywhere on the line); also on with VTPRUNE_DEBUG=1."""
    args = list(argv)
    debug = "--debug" in args or os.environ.get("VTPRUNE_DEBUG", "") not in ("", "0")
    return [a for a in args if a != "--debug"], debug


# --- argument values ---------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_budget(text: str) -> int | float:
    """ "64" -> 64 tokens; "0.25" or "1/9" -> a ratio; anything else a `BudgetError` (one rule with `apply`)."""
    from vtprune.budget import Budget

    return Budget.from_text(text).value


def budget_arg(text: str) -> int | float:
    """argparse type for one budget."""
    try:
        return parse_budget(text)
    except VtpruneError as err:
        raise argparse.ArgumentTypeError(one_line(err)) from None


def positions_arg(text: str) -> str:
    """`--positions`: "keep", "reindex", or one of them per pruning stage, comma-separated ("reindex,keep,reindex",
    what ViTCoP's preset="reference" needs)."""
    rules = text.split(",")
    if not text or any(r not in ("keep", "reindex") for r in rules):
        raise argparse.ArgumentTypeError(
            f"expected keep, reindex, or one of them per stage, comma-separated (e.g. reindex,keep,reindex): {text!r}"
        )
    return text


def budgets_arg(text: str) -> list[int | float]:
    """argparse type for comma-separated budgets."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated budgets (e.g. 192,64,16), got {text!r}")
    return [budget_arg(t) for t in items]


def names_arg(text: str) -> list[str]:
    """argparse type for comma-separated names (no empty list)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _parse_options(items: list[str] | None) -> dict:
    """`["k=1", "fastv.criterion=mean_received"]` -> {"k": 1, "fastv.criterion": "mean_received"}.

    Values are Python literals where they parse (1, 0.5, True, "x", [1, 2]), else strings."""
    import ast

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        method, dot, name = key.rpartition(".")
        if not sep or not name or (dot and not method):
            raise UsageError(f"--option expects KEY=VALUE or METHOD.KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def options_by_method(options: dict, methods: Sequence[str]) -> dict[str, dict]:
    """The one option grammar: `KEY` goes to every chosen method that has the option, `METHOD.KEY` to that
    method only. -> {method: {key: value}}. An unknown method or an option no chosen method has is a
    `VtpruneError` naming it and the accepted ones."""
    from vtprune.registry import method_class

    classes = {m: method_class(m) for m in methods}  # UnknownMethodError for a typo
    valid = {m: set(c.config_class.option_names()) for m, c in classes.items()}
    out: dict[str, dict] = {m: {} for m in methods}
    for key, value in options.items():
        target, dot, opt = key.rpartition(".")
        if dot:
            if target not in classes:
                canon = {c.name: m for m, c in classes.items()}
                if target in canon:
                    target = canon[target]
                else:
                    raise VtpruneError(f"--option {key}: {target!r} is not one of the chosen methods {list(methods)}")
            if opt not in valid[target]:
                raise VtpruneError(
                    f"--option {key}: method {target!r} has no option {opt!r}; its options: {sorted(valid[target])}"
                )
            out[target][opt] = value
            continue
        owners = [m for m in methods if key in valid[m]]
        if not owners:
            accepted = {m: sorted(v) for m, v in valid.items()}
            raise VtpruneError(f"--option {key}: none of the methods {list(methods)} has it; their options: {accepted}")
        for m in owners:
            out[m][key] = value
    return out


def check_methods(methods: Sequence[str]) -> None:
    """Every name registered (else `UnknownMethodError` listing the known ones)."""
    from vtprune.registry import method_class

    for m in methods:
        method_class(m)


def check_path(path: str | Path | None, what: str, kind: str = "any") -> None:
    """A user-given path must exist: 'WHAT not found: PATH' otherwise (never a hub or loader message)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{what} is not a file: {p}")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{what} is not a directory: {p}")


def check_model(model: str) -> None:
    """builtin:NAME must be shipped; arch:/tiny: ids pass; anything else is a local directory that must exist."""
    if model.startswith(("arch:", "tiny:")):
        return
    if model.startswith("builtin:"):
        from vtprune.shipped import builtin_names

        if model[len("builtin:") :] not in builtin_names():
            raise UsageError(missing_builtin(model[len("builtin:") :]))
        return
    p = Path(model)
    if not p.is_dir():
        raise UsageError(
            f"model not found: {model} (expected builtin:NAME or a directory saved with save_pretrained; "
            "nothing is downloaded)"
        )
    if not (p / "config.json").is_file():
        raise UsageError(f"model directory has no config.json: {model}")


def missing_builtin(name: str) -> str:
    """One line for a `builtin:NAME` that is not shipped: the built-in models that exist and, for a model with a
    known recipe (`vtprune.shipped.BUILTIN_RECIPES`), the commands that create it."""
    from vtprune.shipped import BUILTIN_RECIPES, builtin_names

    have = ", ".join(builtin_names()) or "none"
    how = f"; create it with: {BUILTIN_RECIPES[name]}" if name in BUILTIN_RECIPES else ""
    return f"model not found: builtin:{name} (built-in models: {have}{how})"


def default_model() -> str:
    """`builtin:` + the default built-in model (`vtprune.shipped.DEFAULT_BUILTIN`)."""
    from vtprune.shipped import BUILTIN_PREFIX, DEFAULT_BUILTIN

    return BUILTIN_PREFIX + DEFAULT_BUILTIN


def print_result(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def notice(text: str) -> None:
    """A line for the person (file written, note): stderr, so stdout stays the result."""
    print(text, file=sys.stderr, flush=True)


def write_json(path: str | Path, value) -> None:
    from vtprune.tables import write_json as _write

    _write(path, value)
    notice(f"wrote {path}")


def answers_match(answer: str, expected: str) -> bool:
    """Case- and punctuation-insensitive comparison of a generated answer with the expected one."""
    import re

    def norm(s: str) -> str:
        return re.sub(r"[^\w ]+", "", s.lower()).strip()

    return norm(answer) == norm(expected)


# --- argument groups --------------------------------------------------------------------------------------
def add_format(p: argparse.ArgumentParser) -> None:
    from vtprune.tables import FORMATS

    p.add_argument("--format", default="table", choices=FORMATS,
                   help="how results print on stdout (table: readable at 80 columns; json: strict)")  # fmt: skip
