"""A command-line parse error of ``medrl fit|validate|test|predict`` as one line naming the option.

jsonargparse reports a bad option inside a class (``--model.init_args.sampling.temperature hot``) as a
60-line usage dump with the union of subtypes it tried. What the user needs is the option's full name, what it
accepts and what was given, or for a misspelt name the nearest real one:

    --model.init_args.sampling.temperature: expected a float, got 'hot'
    unknown option --model.init_args.sampling.num_generationz (did you mean sampling.num_generations?)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing

_OUTER = re.compile(r'^Parser key "(\w+)":')
_CLASS = re.compile(r"Problem with given class_path '([\w.]+)'")
_UNKNOWN = re.compile(r"unrecognized arguments: (\S+)")
_INNER = re.compile(r'Parser key "([^"]+)":[ \t]*\n?\s*(.+)')
_EXPECTED = re.compile(r"Expected a (?:<class '(\w+)'>|(.+?))\. Got value: (.*)$")


def class_options(class_path: str) -> list[str]:
    """Every option name a class takes: its ``__init__`` parameters, and ``group.field`` for dataclass groups."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the error line stands without them
        return []
    names = []
    for param in params:
        if param in ("self", "args", "kwargs"):
            continue
        names.append(param)
        for hint in (hints.get(param), *typing.get_args(hints.get(param))):
            if dataclasses.is_dataclass(hint):
                names += [f"{param}.{f.name}" for f in dataclasses.fields(hint)]
    return names


def _suggest(name: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _expected(problem: str) -> str:
    match = _EXPECTED.search(problem)
    if not match:
        return problem[:1].lower() + problem[1:]
    if match.group(1):
        kind = f"{'an' if match.group(1)[0] in 'aeiou' else 'a'} {match.group(1)}"
    else:
        kind = match.group(2).replace("typing.", "")
        literal = re.fullmatch(r"Literal\[(.*)\]", kind)
        kind = f"one of {literal.group(1)}" if literal else kind
    return f"expected {kind}, got {match.group(3)!r}"


def one_line_parse_error(message: str) -> str:
    """jsonargparse's message for a bad command line or config, as one line (see the module docstring)."""
    outer = _OUTER.match(message)
    cls = _CLASS.search(message)
    prefix = f"{outer.group(1)}.init_args." if outer and cls else f"{outer.group(1)}." if outer else ""
    unknown = _UNKNOWN.search(message)
    if unknown:
        name = unknown.group(1).lstrip("-").split("=", 1)[0]
        if cls:
            known = class_options(cls.group(1))
        elif name.startswith("trainer."):
            from lightning.pytorch import Trainer

            known, name, prefix = list(inspect.signature(Trainer.__init__).parameters), name[8:], "trainer."
        else:
            known = []
        close = _suggest(name, known)
        return f"unknown option --{prefix}{name}{f' (did you mean {prefix}{close}?)' if close else ''}"
    inner = _INNER.findall(message)
    if inner:
        key, problem = inner[-1]
        full = key if outer and key == outer.group(1) else f"{prefix}{key}"
        return f"--{full}: {_expected(problem.strip())}"
    return " ".join(message.split())
