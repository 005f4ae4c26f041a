"""`medrl models`: every family, what it runs and its tiny model, from the one table in models/families.py."""

from __future__ import annotations

from medrl.cli import main
from medrl.models.families import FAMILIES, FAMILY_TOKENS, FEATURES, SUPPORT, VISION_MODULES


def test_the_table_lists_every_family_and_feature(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for family in FAMILIES:
        assert family in out
    assert "tiny:smolvlm" in out and "tiny-instruct" in out and "FSDP2" in out


def test_every_family_is_described_everywhere() -> None:
    # One family added in one place and forgotten in another would be a silent gap.
    assert set(FAMILIES) == set(SUPPORT) == set(FAMILY_TOKENS) == set(VISION_MODULES)
    assert all(set(SUPPORT[f]) == set(FEATURES) for f in SUPPORT)
