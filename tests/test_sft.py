"""SFTModule: what trains under LoRA and full fine-tuning, PEFT/merged exports, exact mid-epoch resume, the config."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from medrl.cli import main
from medrl.data import vqa
from medrl.data.collate import SFTCollator
from medrl.lit.sft import SFTModule
from medrl.models.lora import LoRAConfig
from medrl.study.configs import MedRLCLI

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sft.yaml")


def _cli(tiny_dir: Path, medmnist, *extra: str) -> MedRLCLI:
    """configs/sft.yaml on the session's tiny model, with a small subset: 64 items = 8 batches per epoch."""
    args = [
        "--config",
        CONFIG,
        f"--model.init_args.model={tiny_dir}",
        *medmnist.cli(),
        "--data.init_args.train_samples=64",
        "--data.init_args.val_samples=8",
        "--data.init_args.batch_size=8",
        *extra,
    ]
    return MedRLCLI(args=args, run=False)


class Recorder(L.Callback):
    """Records each training step's loss and the dataset rows it trained on."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rows: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.rows.append([item["index"] for item in batch])


def _fit(cli: MedRLCLI, max_steps: int, callbacks: list[L.Callback], root: Path, ckpt_path: str | None = None):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def resumed_run(tiny_dir: Path, medmnist, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three runs of the config: 6 steps straight; 3 steps with a checkpoint; resumed from it to step 6."""
    from medrl.callbacks.hf_checkpoint import HFCheckpoint

    root = tmp_path_factory.mktemp("sft_resume")
    # Strong dropout and a large step make the adapters matter, so a replayed-wrong dropout mask would show.
    args = ["--model.init_args.finetune=lora", "--model.init_args.lora.dropout=0.3", "--optimizer.init_args.lr=0.02"]
    straight, first, resumed = Recorder(), Recorder(), Recorder()
    _fit(_cli(tiny_dir, medmnist, *args), 6, [straight], root / "straight")
    saver = HFCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True, merged=True)
    cli = _cli(tiny_dir, medmnist, *args)
    _fit(cli, 3, [first, saver], root / "first")
    ckpt = root / "ckpt" / "epoch=0-step=3.ckpt"
    trained = cli.model
    _fit(_cli(tiny_dir, medmnist, *args), 6, [resumed], root / "resumed", ckpt_path=str(ckpt))
    return {"straight": straight, "first": first, "resumed": resumed, "ckpt": ckpt, "module": trained}


def test_resume_from_a_mid_epoch_checkpoint_continues_exactly(resumed_run: dict) -> None:
    straight, first, resumed = resumed_run["straight"], resumed_run["first"], resumed_run["resumed"]
    assert len(straight.losses) == 6 and len(first.losses) == 3 and len(resumed.losses) == 3
    # Same items in the same order, and (LoRA dropout replayed from a per-step seed) the same losses.
    assert first.rows + resumed.rows == straight.rows
    torch.testing.assert_close(first.losses + resumed.losses, straight.losses, rtol=1e-6, atol=1e-6)
    assert straight.losses[5] < straight.losses[0]  # it does learn


def test_checkpoint_holds_only_trained_weights_and_hf_folders_sit_beside_it(resumed_run: dict) -> None:
    state = torch.load(resumed_run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)
    trained = {n for n, p in resumed_run["module"].named_parameters() if p.requires_grad}
    assert set(state) == trained
    folder = resumed_run["ckpt"].parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch=0-step=3.ckpt",
        "epoch=0-step=3.hf",
        "last.ckpt",
        "last.hf",
    ]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors"):
        # `last` is the same step: its folder is a copy of the other, not a second export
        assert (folder / "last.hf" / name).read_bytes() == (folder / "epoch=0-step=3.hf" / name).read_bytes()


def test_lora_trains_only_adapter_weights(tiny_dir: Path) -> None:
    module = SFTModule(model=str(tiny_dir), lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model.layers" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # the vision tower's own *_proj layers get no adapter
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, _ = module._loss([_item("A", 0), _item("B", 1)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero: a change proves the update is live


def test_vision_options_and_full_finetuning(tiny_dir: Path) -> None:
    projector = SFTModule(model=str(tiny_dir), vision="projector")
    trained = [n for n, p in projector.model.named_parameters() if p.requires_grad and "visual" in n]
    assert trained and all("merger" in n for n in trained)
    full = SFTModule(model=str(tiny_dir), finetune="full")
    for name, param in full.model.named_parameters():
        assert param.requires_grad == ("visual" not in name), name
    with pytest.raises(ValueError, match="match no language-model layer"):
        SFTModule(model=str(tiny_dir), lora=LoRAConfig(target_modules=["qkv"]))  # a vision-only layer name


def _item(answer: str, seed: int, size: int = 28) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    prompt = vqa.format_prompt("What does this chest X-ray show?", {"A": "normal", "B": "pneumonia"})
    return {"image": image, "messages": vqa.chat_messages(prompt), "answer": answer}


def _logits(model: torch.nn.Module, processor) -> torch.Tensor:
    batch = SFTCollator(processor)([_item("A", 3), _item("B", 4, size=56)])
    with torch.no_grad():
        return model.eval()(**batch.inputs).logits


def test_saved_adapter_and_merged_model_reproduce_the_trained_model(resumed_run: dict, tiny_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    module = resumed_run["module"]
    hf = resumed_run["ckpt"].with_name("epoch=0-step=3.hf")
    processor = AutoProcessor.from_pretrained(hf / "adapter")  # the processor travels with the adapter
    trained = _logits(module.model, processor)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    base_logits = _logits(base, processor)
    assert (trained - base_logits).abs().max() > 1e-3  # training moved the outputs, so equality below means something

    reloaded = PeftModel.from_pretrained(base, hf / "adapter")
    torch.testing.assert_close(_logits(reloaded, processor), trained, atol=1e-5, rtol=1e-5)
    merged = AutoModelForImageTextToText.from_pretrained(hf / "merged")
    torch.testing.assert_close(_logits(merged, processor), trained, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_config_fast_dev_run_through_the_cli(tiny_dir: Path, medmnist, tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        CONFIG,
        f"--model.init_args.model={tiny_dir}",
        *medmnist.cli(),
        "--trainer.fast_dev_run=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert main(args) == 0


@pytest.mark.gpu
def test_bf16_lora_step_on_gpu(tiny_dir: Path) -> None:
    module = SFTModule(model=str(tiny_dir), gradient_checkpointing=True).cuda()
    base_dtypes = {p.dtype for n, p in module.model.named_parameters() if not p.requires_grad}
    assert base_dtypes == {torch.bfloat16}  # dtype auto: bf16 when a GPU is visible
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}  # PEFT keeps adapters fp32
    loss, _ = module._loss([_item("A", 0), _item("B", 1, size=56)])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
