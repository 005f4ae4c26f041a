"""`medrl models`: every family, what it runs and its tiny model, from the one table in models/families.py."""

from __future__ import annotations

import pytest

from medrl.cli import main
from medrl.models.families import FEATURES, UnsupportedModelError, families, family_of, tiny_ids


def test_the_table_lists_every_family_and_feature(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for family in families():
        assert family in out
    for tiny in tiny_ids():
        assert tiny in out
    assert "FSDP2" in out and "multi-image" in out


def test_every_family_says_every_feature_and_has_a_tiny_model() -> None:
    # A feature left out of one family's table would be a silent gap in `medrl models`.
    for family in families().values():
        assert set(family.support) == set(FEATURES), family.name
        assert family.tiny and family.placeholders and family.turn_ends and family.tower, family.name
    assert {"qwen2_vl", "qwen3_vl", "idefics3", "gemma3", "internvl"} <= set(families())


def test_a_model_of_no_family_gets_one_line_naming_them() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'llava'.*gemma3 \(gemma3\).*medrl models"):
        family_of("llava")
    assert family_of("qwen2_5_vl").name == "qwen2_vl" and family_of("smolvlm").name == "idefics3"
