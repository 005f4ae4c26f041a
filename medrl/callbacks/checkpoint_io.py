"""Checkpoint files written in their own folder: a temp file beside the target, fsync, rename.

Lightning 2.6 saves through an fsspec transaction, which stages the file in ``TMPDIR`` and then moves it.
When ``TMPDIR`` is on another filesystem (a tmpfs ``/tmp``, common on clusters) the move truncates the target
and copies into it: a kill during the copy leaves ``last.ckpt`` at 0 bytes with the previous good one gone, and
a small ``TMPDIR`` fails the save of a run whose own disk has room. :class:`AtomicCheckpointIO` never touches
``TMPDIR``; the older checkpoint stays whole until the new one is complete on the same disk. A full disk is
reported as one line naming the folder, the space the checkpoint needs and the space left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medrl.core.io import RUN_DIR_FIX, atomic_write_with


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors inside ``obj`` (dicts, lists, tuples): about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on the target's own filesystem (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` through ``.NAME.*.part`` in the same folder, fsync, rename."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        atomic_write_with(
            target,
            lambda fh: torch.save(checkpoint, fh),
            tensor_bytes(checkpoint),
            f"checkpoint {target.name}",
            RUN_DIR_FIX,
        )
