"""ResumableLoader: seeded per-epoch order, and Lightning resumes mid-epoch and at epoch ends on the next batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medrl.data.resumable import ResumableLoader

N, BATCH = 20, 4  # 5 batches per epoch


class Rows(L.LightningModule):
    """A one-weight model that records the dataset rows of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        return (self.w - batch.float().mean()).pow(2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(max_steps: int, root: Path, ckpt_path: str | None = None, every: int | None = None) -> list[list[int]]:
    model = Rows()
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, ResumableLoader(list(range(N)), batch_size=BATCH, seed=7), ckpt_path=ckpt_path)
    return model.seen


def test_each_epoch_is_a_seeded_permutation() -> None:
    loader = ResumableLoader(list(range(N)), batch_size=BATCH, seed=7)
    first = [row for batch in loader for row in batch.tolist()]
    assert sorted(first) == list(range(N)) and first != list(range(N))
    assert [row for batch in loader for row in batch.tolist()] == first  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert [row for batch in loader for row in batch.tolist()] != first
    with pytest.raises(ValueError, match="makes its own shuffling sampler"):
        ResumableLoader(list(range(N)), shuffle=True)


@pytest.mark.parametrize("stop", [3, 5, 7], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_lightning_resume_continues_with_the_next_batch(tmp_path: Path, stop: int) -> None:
    straight = _fit(9, tmp_path / "straight")
    first = _fit(stop, tmp_path / "first", every=stop)
    ckpt = next((tmp_path / "first").glob(f"*step={stop}.ckpt"))
    resumed = _fit(9, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert first + resumed == straight


def test_state_after_a_finished_epoch_starts_the_next() -> None:
    loader = ResumableLoader(list(range(N)), batch_size=BATCH, seed=7)
    loader.load_state_dict({"epoch": 0, "batches": N // BATCH})
    expected = ResumableLoader(list(range(N)), batch_size=BATCH, seed=7)
    expected.sampler.set_epoch(1)
    assert [b.tolist() for b in loader] == [b.tolist() for b in expected]
    assert loader.state_dict() == {"epoch": 1, "batches": N // BATCH}
