"""Faults that lost work, reported a broken run as fine, or read outside the named folder: one test each."""

from __future__ import annotations

import csv
import errno
import json
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from medrl.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST_SFT = ["--trainer.max_steps=2", "--data.init_args.train_samples=32", "--data.init_args.val_samples=16"]


def _sft(tiny_dir: Path, medmnist, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}",
            *medmnist.cli(), f"--trainer.default_root_dir={root}", *FAST_SFT, *extra]  # fmt: skip


def _medrl_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("medrl ")]


def _checkpoints(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


# 1. checkpoint saves never go through TMPDIR ------------------------------------------------------------------
def test_a_checkpoint_save_does_not_go_through_tmpdir(tiny_dir, medmnist, tmp_path, monkeypatch) -> None:
    # Lightning stages a checkpoint in TMPDIR and moves it: across filesystems that truncates the target and
    # copies (a kill leaves last.ckpt at 0 bytes). With no usable TMPDIR at all the save must still succeed.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    assert main(_sft(tiny_dir, medmnist, tmp_path / "run")) == 0
    last = [p for p in _checkpoints(tmp_path / "run") if p.name == "last.ckpt"]
    assert len(last) == 1 and torch.load(last[0], weights_only=True, mmap=True)["global_step"] == 2
    assert not list((tmp_path / "run").rglob("*.part"))


def test_a_full_disk_keeps_the_old_checkpoint_and_names_the_folder(tmp_path, monkeypatch) -> None:
    from medrl.callbacks.checkpoint_io import AtomicCheckpointIO
    from medrl.core.errors import UserError

    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def fill_the_disk(obj, fh) -> None:  # the disk fills part-way through the write
        fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(UserError, match=r"no space left in .*ckpts to save checkpoint last.ckpt \(needs about 0.0 MB"):
        io.save_checkpoint({"w": torch.zeros(1000)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before  # the good checkpoint is whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # and nothing staged is left behind


# 2. one run, one version folder ------------------------------------------------------------------------------
def test_runs_started_together_get_their_own_version_folders(tmp_path) -> None:
    from medrl.study.trainer_defaults import run_loggers

    versions: list[int] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        versions.append(run_loggers(None, tmp_path)[0].version)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(6))
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == [f"version_{i}" for i in range(6)]


# 3. --ckpt_path last resumes or refuses ----------------------------------------------------------------------
def test_ckpt_path_last_resumes_the_newest_last_checkpoint(tiny_dir, medmnist, tmp_path, capsys) -> None:
    root = tmp_path / "run"
    # 3 batches an epoch: the first run stops mid-epoch at step 2.
    run = [*_sft(tiny_dir, medmnist, root), "--data.init_args.train_samples=48", "--trainer.log_every_n_steps=1"]
    assert main(run) == 0
    (first,) = [p for p in _checkpoints(root) if p.name == "last.ckpt"]
    capsys.readouterr()
    assert main([*run, "--trainer.max_steps=3", "--ckpt_path", "last"]) == 0
    assert f"resuming from {first}" in capsys.readouterr().err
    newest = max((p for p in _checkpoints(root) if p.name == "last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest != first and torch.load(newest, weights_only=True, mmap=True)["global_step"] == 3
    # It continued: the second run trained one step (step index 2), not three from scratch.
    with (newest.parent.parent / "metrics.csv").open() as fh:
        trained = {row["step"] for row in csv.DictReader(fh) if row.get("train/loss")}
    assert trained == {"2"}


def test_ckpt_path_last_without_a_checkpoint_is_refused(tiny_dir, medmnist, tmp_path, capsys) -> None:
    assert main([*_sft(tiny_dir, medmnist, tmp_path / "empty"), "--ckpt_path", "last"]) == 2
    (line,) = _medrl_lines(capsys)
    assert line.startswith("medrl fit: error: --ckpt_path last: no last.ckpt under") and str(tmp_path / "empty") in line
    assert not (tmp_path / "empty" / "lightning_logs").exists() or not _checkpoints(tmp_path / "empty")


# 4. a data file cannot make medrl read outside the named folder --------------------------------------------
def test_suite_rows_naming_files_outside_the_folder_are_dropped_unread(tmp_path) -> None:
    from PIL import Image

    from medrl.data.benchmarks import read_jsonl_items
    from medrl.data.image_store import ImageStore

    suite, outside = tmp_path / "suite", tmp_path / "outside"
    (suite / "images").mkdir(parents=True)
    outside.mkdir()
    for where in (suite / "images" / "ok.png", outside / "x.png"):
        Image.new("RGB", (8, 8)).save(where)
    row = {"dataset_name": "VQA-RAD", "question": "Q?", "options": {"A": "yes", "B": "no"}, "answer_label": "A",
           "answer": "yes"}  # fmt: skip
    paths = [["images/ok.png"], ["../outside/x.png"], ["images/../../outside/x.png"], [str(outside / "x.png")]]
    (suite / "suite.jsonl").write_text("".join(json.dumps({**row, "images": p, "dataset_index": i}) + "\n"
                                               for i, p in enumerate(paths)))  # fmt: skip
    store = ImageStore(suite)
    opened: list[str] = []
    real_read = Path.read_bytes
    Path.read_bytes = lambda self: (opened.append(str(self)), real_read(self))[1]  # type: ignore[method-assign]
    try:
        items, report = read_jsonl_items(suite / "suite.jsonl", store)
    finally:
        Path.read_bytes = real_read  # type: ignore[method-assign]
    assert [it.images for it in items] == [("images/ok.png",)]
    assert report.counts()["outside_folder"] == 3
    assert not any("outside" in path for path in opened), opened
    # The same rule without any image check: nothing is opened, and the rows still go.
    items, report = read_jsonl_items(suite / "suite.jsonl", None, image_check="none")
    assert len(items) == 1 and report.counts()["outside_folder"] == 3


# 5. a non-finite loss or weight stops the run; nothing non-finite is saved ---------------------------------
def _finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, weights_only=True, mmap=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_sft_with_a_huge_learning_rate_stops_at_the_first_non_finite_step(tiny_dir, medmnist, tmp_path, capsys) -> None:
    root = tmp_path / "run"
    code = main(_sft(tiny_dir, medmnist, root, "--optimizer.init_args.lr=1e9"))
    (line,) = _medrl_lines(capsys)
    assert code == 2 and line.startswith("medrl fit: error: step ") and "is not finite" in line
    assert "learning rate (1e+09) is too high" in line
    assert all(_finite(c) for c in _checkpoints(root))
    assert not list(root.rglob("*.hf"))  # no export of a broken model either


def test_grpo_with_a_huge_learning_rate_stops_naming_the_cause(medmnist, tmp_path, capsys) -> None:
    root = tmp_path / "run"
    # rl.yaml's own base (tiny-instruct): its groups differ in reward, so the first update moves the weights.
    args = ["fit", "--config", str(REPO / "configs/rl.yaml"), *medmnist.cli(),
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=3",
            "--model.init_args.optim.lr=1e9"]  # fmt: skip
    code = main(args)
    (line,) = _medrl_lines(capsys)
    assert code == 2 and "not finite" in line and "--model.init_args.optim.lr" in line, line
    assert all(_finite(c) for c in _checkpoints(root))
