"""``medrl report RUN_DIR``: the study report rebuilt from a run directory."""

from __future__ import annotations

from medrl.report import build_report


def report(run_dir: str) -> int:
    """Build report.md and its figures from a study run directory.

    Args:
        run_dir: the run directory (written by `medrl reproduce`).
    """
    path = build_report(run_dir)
    print(f"wrote {path} and {path.parent / 'figures'}/")
    return 0
