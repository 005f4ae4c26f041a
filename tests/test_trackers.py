"""Experiment trackers: TensorBoard beside CSV by default, the configs/loggers fragments, tables and images
to whichever tracker is on. Each fit runs for real (medrl fit on tiny, real or synthetic PneumoniaMNIST)."""

from __future__ import annotations

import csv
import glob
import importlib.util
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from medrl.cli import main
from medrl.study.trainer_defaults import expand_run_dir, next_version, run_loggers

REPO = Path(__file__).resolve().parents[1]
LOGGERS = REPO / "configs" / "loggers"
# Two GRPO steps, one validation with Pass@K on 4 questions: every kind of value a tracker receives.
SHORT = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
    "--model.init_args.log_completions_every", "1", "--model.init_args.sampling.max_completion_length", "12",
    "--model.init_args.sampling.val_max_new_tokens", "8", "--data.init_args.train_samples", "8",
    "--data.init_args.val_samples", "4",
]  # fmt: skip
PASS_AT_K = [
    "--config", str(REPO / "callbacks" / "pass_at_k.yaml"), "--trainer.callbacks.n", "4",
    "--trainer.callbacks.ks", "[1, 2, 4]", "--trainer.callbacks.max_questions", "4",
    "--trainer.callbacks.max_new_tokens", "8", "--trainer.callbacks.before_training", "false",
]  # fmt: skip


def _fit(medmnist, root: Path, *extra: str) -> None:
    argv = ["fit", "--config", str(REPO / "configs" / "rl.yaml"), *extra, *SHORT,
            "--trainer.default_root_dir", str(root), *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0


def test_default_is_tensorboard_and_csv_in_one_folder(medmnist, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fit(medmnist, tmp_path / "run")
    folders = sorted((tmp_path / "run" / "lightning_logs").iterdir())
    assert [f.name for f in folders] == ["version_0"]  # one folder, not one per logger
    assert (folders[0] / "metrics.csv").is_file() and glob.glob(str(folders[0] / "events.out.tfevents.*"))


def test_tensorboard_fragment_scalars_curves_and_table_read_back(medmnist, tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    _fit(medmnist, tmp_path / "run", "--config", str(LOGGERS / "tensorboard.yaml"), *PASS_AT_K)
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"time/generate", "time/update", "time/step", "reward/mean", "val/pass@4", "val/acc@1"} <= scalars
    assert [e.step for e in events.Scalars("reward/mean")] == [0, 1]
    assert "val/pass_at_k_curve" in events.Tags()["images"]  # the curve as a picture
    table = events.Tensors("train/completions/text_summary")  # add_text: the completions table
    assert b"| step | prompt |" in table[0].tensor_proto.string_val[0]
    # CSV stays beside it, in the same folder, with the same rewards.
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("reward/mean")]
    assert [float(r["reward/mean"]) for r in rows] == pytest.approx([e.value for e in events.Scalars("reward/mean")])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason='W&B not installed: pip install "medrl[wandb]"')
def test_wandb_fragment_offline(medmnist, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    _fit(medmnist, tmp_path / "run", "--config", str(LOGGERS / "wandb.yaml"), *PASS_AT_K)
    wandb.finish()  # a process would close the run at exit; in one it stays open, its summary unwritten
    runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
    assert len(runs) == 1, "the offline run folder, inside the run's own folder"
    media = Path(runs[0]) / "files" / "media"
    assert list((media / "table").rglob("*.table.json")), "the completions table"
    assert list((media / "images").rglob("*.png")), "the Pass@K curve"
    # The run's history records (protobuf) name each logged key.
    (records,) = Path(runs[0]).glob("run-*.wandb")
    assert all(key in records.read_bytes() for key in (b"time/step", b"reward/mean", b"val/pass@4"))
    assert (tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv").is_file()  # CSV kept beside


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason='MLflow not installed: pip install "medrl[mlflow]"'
)
def test_mlflow_fragment_local_file_store(medmnist, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    _fit(medmnist, tmp_path / "run", "--config", str(LOGGERS / "mlflow.yaml"), *PASS_AT_K)
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'runs' / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medrl").experiment_id])
    # MLflow allows no "@" in a metric name: Lightning drops it (val/pass@4 -> val/pass4).
    assert {"time/step", "reward/mean", "val/pass4"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_completions", "val_pass_at_k_curve"} <= artifacts
    tables = [a.path for a in client.list_artifacts(run.info.run_id, "train_completions")]
    assert tables == ["train_completions/step_000001.json", "train_completions/step_000002.json"]


def test_run_loggers_keeps_csv_beside_a_chosen_tracker(tmp_path) -> None:
    (tmp_path / "lightning_logs" / "version_3").mkdir(parents=True)
    assert next_version(tmp_path) == 4
    default = run_loggers(None, tmp_path)
    assert [type(lg) for lg in default] == [CSVLogger, TensorBoardLogger]
    assert {lg.log_dir for lg in default} == {str(tmp_path / "lightning_logs" / "version_4")}
    tb = TensorBoardLogger(tmp_path, default_hp_metric=False)
    chosen = run_loggers([tb], tmp_path)
    assert [type(lg) for lg in chosen] == [CSVLogger, TensorBoardLogger] and chosen[0].log_dir == tb.log_dir
    only_csv = CSVLogger(tmp_path / "elsewhere")
    assert run_loggers([only_csv], tmp_path) == [only_csv]
    assert run_loggers(False, tmp_path) is False


def test_run_dir_placeholder_is_expanded() -> None:
    config = [
        {"class_path": "X", "init_args": {"save_dir": "${default_root_dir}", "uri": "file:${default_root_dir}/m"}}
    ]
    assert expand_run_dir(config, "/runs/a") == [
        {"class_path": "X", "init_args": {"save_dir": "/runs/a", "uri": "file:/runs/a/m"}}
    ]
