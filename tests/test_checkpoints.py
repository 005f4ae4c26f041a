"""The end of training always leaves ``last`` at the final step (SFT, GRPO and probes), export included.

Lightning saves ``last`` on its schedule and, at the end, only when none was saved yet: every 5 steps with
max_steps 12 left ``last.ckpt`` and ``last.hf`` at step 10.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from medrl.callbacks.checkpoint import Checkpoint
from medrl.callbacks.hf_checkpoint import HFCheckpoint
from medrl.callbacks.step_exports import StepExports, step_export_dir
from medrl.study.configs import MedRLCLI

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(config: str, tiny_dir: Path, medmnist, out: Path, steps: int, every: int, *extra: str, more=()) -> L.Trainer:
    args = ["--config", str(REPO / "configs" / config), f"--model.init_args.model={tiny_dir}", *medmnist.cli(),
            "--data.init_args.train_samples=64", "--data.init_args.val_samples=2", *extra]  # fmt: skip
    cli = MedRLCLI(args=args, run=False)
    ckpt = HFCheckpoint(dirpath=out, every_n_train_steps=every, save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, callbacks=[ckpt, *more], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)  # fmt: skip
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return trainer


def _assert_last_is_final(trainer: L.Trainer, out: Path, steps: int) -> None:
    assert trainer.global_step == steps
    saved = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == steps
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(out / "last.hf" / "model").state_dict()
    live = trainer.lightning_module.model.state_dict()
    moved = [n for n, p in trainer.lightning_module.model.named_parameters() if p.requires_grad]
    assert moved and all(torch.equal(exported[n], live[n]) for n in moved)


def test_sft_last_is_the_final_step_not_the_last_scheduled_one(tiny_dir, medmnist, tmp_path) -> None:
    trainer = _fit("sft.yaml", tiny_dir, medmnist, tmp_path, 12, 5, "--data.init_args.batch_size=2")
    _assert_last_is_final(trainer, tmp_path, 12)


def test_a_step_export_is_the_model_a_run_of_that_many_steps_ends_with(tiny_dir, medmnist, tmp_path) -> None:
    # The boundary sweep's rungs are read off one SFT run this way instead of being trained anew.
    exports = StepExports([3], str(tmp_path / "steps"))
    _fit("sft.yaml", tiny_dir, medmnist, tmp_path / "long", 6, 100, "--data.init_args.batch_size=2", more=[exports])
    _fit("sft.yaml", tiny_dir, medmnist, tmp_path / "short", 3, 100, "--data.init_args.batch_size=2")
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["step-3.hf"]
    from safetensors.torch import load_file

    cut = load_file(step_export_dir(tmp_path / "steps", 3) / "model" / "model.safetensors")
    trained = load_file(tmp_path / "short" / "last.hf" / "model" / "model.safetensors")
    assert cut.keys() == trained.keys() and all(torch.equal(cut[k], trained[k]) for k in cut)
    # ...and it is not the long run's end: its three more steps moved the weights.
    final = load_file(tmp_path / "long" / "last.hf" / "model" / "model.safetensors")
    assert any(not torch.equal(cut[k], final[k]) for k in cut)


def test_step_exports_refuse_a_step_below_one() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        StepExports([0, 5], "out")


def test_grpo_last_is_the_final_step_not_the_last_scheduled_one(tiny_dir, medmnist, tmp_path) -> None:
    extra = ["--data.init_args.batch_size=1", "--model.init_args.sampling.num_generations=2",
             "--model.init_args.sampling.max_completion_length=4", "--model.init_args.optim.lr=1e-3"]  # fmt: skip
    trainer = _fit("rl.yaml", tiny_dir, medmnist, tmp_path, 5, 3, *extra)
    _assert_last_is_final(trainer, tmp_path, 5)


def test_the_probe_configs_use_the_checkpoint_that_keeps_last_final() -> None:
    import yaml

    for path in sorted((REPO / "configs").glob("probe*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        paths = {c["class_path"] for c in callbacks}
        assert "lightning.pytorch.callbacks.ModelCheckpoint" not in paths, path
        assert "medrl.callbacks.checkpoint.Checkpoint" in paths, path
    assert issubclass(HFCheckpoint, Checkpoint)


def test_a_plain_module_gets_its_final_step_as_last(tmp_path) -> None:
    # What the probes rely on: the generic callback, on a module with nothing to export.
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.w(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 2)), batch_size=2)
    ckpt = Checkpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 12
