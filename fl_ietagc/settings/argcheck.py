"""Command-line options given twice are refused, not resolved silently.

argparse keeps the last value of an option given twice (`--run-config a --run-config b` runs b, dropping a
without a word). Every entry point calls `refuse_repeated(parser, argv)` before parsing: an option that takes
one value, given twice, exits 2 with one line naming it. Options meant to repeat (action="append") and flags
are left alone."""

from __future__ import annotations

import argparse
import sys

SINGLE = (argparse._StoreAction,)


def _action(parser: argparse.ArgumentParser, option: str):
    actions = parser._option_string_actions
    if option in actions:
        return actions[option]
    if option.startswith("--") and parser.allow_abbrev:  # argparse's unique-prefix abbreviations
        found = {id(a): a for name, a in actions.items() if name.startswith(option)}
        if len(found) == 1:
            return next(iter(found.values()))
    return None


def repeated_option(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first single-value option given twice in `argv` (subcommands followed), as a one-line message."""
    seen: dict[str, str] = {}
    current = parser
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or token[1:2].isdigit():
            sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub is not None and token in sub.choices:
                current, seen = sub.choices[token], {}
            continue
        option = token.split("=", 1)[0]
        action = _action(current, option)
        if action is None or not isinstance(action, SINGLE):
            continue
        if action.dest in seen:
            return f"{seen[action.dest]} is given twice; give it once (the first would be dropped silently)"
        seen[action.dest] = option
    return None


def refuse_repeated(parser: argparse.ArgumentParser, argv=None, prefix: str | None = None) -> None:
    """Exit 2 with one line if a single-value option of `parser` is given twice in `argv` (default sys.argv)."""
    problem = repeated_option(parser, sys.argv[1:] if argv is None else list(argv))
    if problem:
        print(f"{prefix or parser.prog}: invalid input: {problem}", file=sys.stderr)
        raise SystemExit(2)
