"""Tables and pictures to whichever experiment tracker is on: TensorBoard, W&B, MLflow (CSV keeps files only).

Lightning's loggers share ``log_metrics`` for scalars but nothing for a table or an image, so each call here
asks every logger of a run in its own terms: TensorBoard gets a markdown table as text and the image as an
image summary; W&B a ``wandb.Table`` and a ``wandb.Image``; MLflow a JSON table artifact and a PNG artifact.
Loggers it does not know (CSV, custom ones) are skipped: medrl writes the same content to files beside them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

from medrl.core.tables import markdown_table


def _kind(logger: Any) -> str:
    """``tensorboard``, ``wandb``, ``mlflow`` or ``other``, by Lightning logger class (subclasses included)."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    for kind, name in (("tensorboard", "TensorBoardLogger"), ("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger")):
        if name in names:
            return kind
    return "other"


def _artifact_name(key: str, step: int, suffix: str) -> str:
    """A file name MLflow accepts for ``key`` at ``step``: ``train_completions/step_000020.json``."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}/step_{step:06d}{suffix}"


def log_table(
    loggers: Iterable[Any], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> list[str]:
    """Send one table to every tracker that shows tables; returns the kinds it went to."""
    sent = []
    for logger in loggers:
        kind = _kind(logger)
        if kind == "tensorboard":
            text = "\n".join(markdown_table(list(columns), [[_cell(v) for v in row] for row in rows]))
            logger.experiment.add_text(key, text, global_step=step)
        elif kind == "wandb":
            logger.log_table(key, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif kind == "mlflow":
            data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
            logger.experiment.log_table(logger.run_id, data=data, artifact_file=_artifact_name(key, step, ".json"))
        else:
            continue
        sent.append(kind)
    return sent


def log_png(loggers: Iterable[Any], key: str, png: bytes, step: int) -> list[str]:
    """Send one PNG picture (e.g. a Pass@k curve) to every tracker that shows images; returns the kinds."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    sent = []
    for logger in loggers:
        kind = _kind(logger)
        if kind == "tensorboard":
            logger.experiment.add_image(key, np.asarray(image), global_step=step, dataformats="HWC")
        elif kind == "wandb":
            logger.log_image(key, images=[image], step=step)
        elif kind == "mlflow":
            logger.experiment.log_image(logger.run_id, image, artifact_file=_artifact_name(key, step, ".png"))
        else:
            continue
        sent.append(kind)
    return sent


def _cell(value: Any) -> str:
    """A table cell as one markdown-safe line."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")
