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
    for column in ("family", "architectures", *FEATURES, "probe encoder"):
        table.add_column(column)
    colours = {"tested": "green", "tested (slow)": "green", "untested": "red", "no": "red"}
    for family in families().values():
        cells = [f"[{colours.get(family.support[f], 'white')}]{family.support[f]}[/]" for f in FEATURES]
        encoder = f"{family.encoder}: / vlm:" if family.encoder else "vlm:"
        table.add_row(family.name, family.architectures, *cells, encoder)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for family in families().values():
        print(f"{family.name} (model_type {', '.join(family.model_types)}): offline {', '.join(family.tiny)}; "
              f"e.g. {family.examples}")  # fmt: skip
    print(
        "multi-image: a question's several images go to the model as separate images (bench-eval --images "
        "tiled tiles them into one picture instead)"
    )
    print("model fragments for real hub models: configs/models/*.yaml")
    return 0
