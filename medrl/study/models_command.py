"""``medrl models``: the VLM families medrl knows, what each runs (as tested), and their offline tiny models."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from medrl.models.families import FEATURES, families


def models() -> int:
    """List the VLM families, what medrl runs on each (tested on the family's tiny model, or untested) and the
    tiny model ids to try them offline."""
    table = Table(title="VLM families (tested: the test suite runs it on the family's tiny model)")
    for column in ("family", "architectures", "tiny", *FEATURES, "e.g."):
        table.add_column(column)
    colours = {"tested": "green", "tested (slow)": "green", "tiled": "yellow", "untested": "red", "no": "red"}
    for family in families().values():
        cells = [f"[{colours.get(family.support[f], 'white')}]{family.support[f]}[/]" for f in FEATURES]
        table.add_row(family.name, family.architectures, ", ".join(family.tiny) or "-", *cells, family.examples)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    print("multi-image 'tiled': several images of one question are tiled into one picture (native multi-image "
          "prompts are to come)")  # fmt: skip
    return 0
