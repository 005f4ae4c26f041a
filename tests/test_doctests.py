"""Run the doctests of every medrl module that has them (reward functions, prompt builders, parsers)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import medrl

ROOT = Path(medrl.__path__[0]).parent
# Found from the source text, so a new module with doctests is picked up without editing this list.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(medrl.__path__, "medrl.")
    if not info.ispkg and ">>>" in (ROOT / (info.name.replace(".", "/") + ".py")).read_text()
)


def test_some_modules_have_doctests() -> None:
    assert "medrl.metrics.answers" in MODULES and "medrl.data.vqa" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
