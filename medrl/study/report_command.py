"""``medrl report RUN_DIR``: the study report rebuilt from a run directory.

A folder that holds no study is refused (an empty one would get an all-"not run" report written into it), a
``stages.json`` that is not medrl's is named, and a study stopped part-way says which stages have not finished,
on the terminal before anything else and at the top of ``report.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medrl.core.errors import ConfigError, UserError

# What `medrl reproduce` writes first into a run folder: a folder with none of these holds no study.
STUDY_MARKERS = ("plan.json", "stages.json", "runcard.json")


def planned_stages(run_dir: Path) -> list[str]:
    """The stage names the run's ``plan.json`` asks for (empty when it cannot be read)."""
    from medrl.study.plan import load_plan
    from medrl.study.reproduce import build_stages
    from medrl.study.stages import Study

    try:
        return [stage.name for stage in build_stages(Study(load_plan(run_dir / "plan.json"), run_dir))]
    except (OSError, ConfigError, TypeError, ValueError):
        return []


def unfinished_stages(run_dir: Path) -> list[str]:
    """The planned stages (the report itself aside) that ``stages.json`` does not record as done."""
    from medrl.report.load import check_stages, read_json

    stages_file = run_dir / "stages.json"
    records = check_stages(read_json(stages_file), stages_file) if stages_file.is_file() else {}
    planned = planned_stages(run_dir) or list(records)
    return [name for name in planned if name != "report" and records.get(name, {}).get("status") != "done"]


def report(run_dir: str) -> int:
    """Build report.md and its figures from a study run directory.

    Args:
        run_dir: the run directory (written by `medrl reproduce`).
    """
    root = Path(run_dir)
    if root.is_dir() and not any((root / name).is_file() for name in STUDY_MARKERS):
        raise UserError(
            f"{root} holds no study (no {', '.join(STUDY_MARKERS)}): pass the folder `medrl reproduce --out` wrote, "
            "or run the study into it first"
        )
    unfinished = unfinished_stages(root) if root.is_dir() else []
    if unfinished:
        shown = ", ".join(unfinished[:6]) + (f" and {len(unfinished) - 6} more" if len(unfinished) > 6 else "")
        print(
            f"medrl report: {root} is not a finished study: {len(unfinished)} stages have not finished ({shown}); "
            "their sections read 'not run'. `medrl reproduce` with the same --plan and --out finishes it.",
            file=sys.stderr,
        )
    from medrl.report import build_report  # matplotlib and torch: not for `medrl report --help`

    path = build_report(run_dir, unfinished=unfinished)
    print(f"wrote {path} and {path.parent / 'figures'}/")
    return 0
