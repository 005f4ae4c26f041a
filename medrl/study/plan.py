"""The study plan: which models, modalities and settings `medrl reproduce` runs, read from a YAML file.

Plans live in ``configs/study/`` (``cpu.yaml`` for a laptop CPU, ``paper.yaml`` for the paper's scale on
GPUs). Every field has a default, so a plan file states only what differs.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from medrl.core.errors import ConfigError
from medrl.core.io import atomic_write_json, load_yaml
from medrl.data.medmnist_files import FLAGS_2D, check_size, info
from medrl.metrics.chance import room_k
from medrl.rollout.types import PASS_AT_K_TEMPERATURE, PASS_AT_K_TOP_P
from medrl.study.probe_table import probe_heads

ProbeName = Literal["sgd", "adamw", "lbfgs", "knn"]


@dataclass
class VisionPlan:
    """Stage 1, the probe table (arguments of ``medrl probe-table``).

    Args:
        encoders: encoder specs (``timm:resnet18,pretrained=false``, ``vlm:tiny``, ``vlm:<HF id or folder>``).
        optimizer: probe optimiser, or a list of them (each a row): sgd (the authors'), adamw, lbfgs or knn
            (the authors' weighted cosine kNN).
        lr: learning rate of the sgd/adamw probes (None: 0.1 / 1e-4); a list is a sweep, one head and row per
            rate on the features extracted once.
        max_epochs: probe epochs.
        train_samples: seeded subset of training images per flag (None: all).
        test_samples: subset of test images (None: all).
    """

    encoders: list[str] = field(default_factory=lambda: ["timm:resnet18,pretrained=false", "vlm:tiny"])
    optimizer: ProbeName | list[ProbeName] = "sgd"
    lr: float | list[float] | None = None
    max_epochs: int = 20
    train_samples: int | None = None
    test_samples: int | None = None


@dataclass
class SupportPlan:
    """How every Acc@1 / Pass@K measurement of the study samples.

    Args:
        n: samples per question (n >= every k).
        ks: the k values reported.
        k: the k the recipe and the gap G_k use, or ``room``: per flag, the largest k of ``ks`` whose chance level
            is <= 0.75 (binary flags: 2; 4 options: 4), so that support has room above guessing.
        temperature: sampling temperature.
        top_p: nucleus mass.
        max_new_tokens: completion budget.
        questions: validation questions per modality.
        engine: hf or vllm.
        batch_size: questions per engine call.
        image_ablation: also answer every question greedily with another question's image and report each
            model's image reliance (Acc@1 with the right image minus with the swapped one).
    """

    n: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    k: int | Literal["room"] = 8
    temperature: float = PASS_AT_K_TEMPERATURE
    top_p: float = PASS_AT_K_TOP_P
    max_new_tokens: int = 64
    questions: int = 64
    engine: Literal["hf", "vllm"] = "hf"
    batch_size: int = 32
    image_ablation: bool = True


@dataclass
class TrainPlan:
    """One training stage: a base config plus overrides merged on top (as a second ``--config``).

    Args:
        config: the experiment config (``configs/sft.yaml``, ``configs/rl.yaml``, ...).
        overrides: nested config values applied on top of it.
    """

    config: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyPlan:
    """Everything `medrl reproduce` needs.

    Args:
        name: the plan's name, shown in the report.
        illustrative: the report's first line says the numbers are illustrative (CPU scale).
        model: the base VLM (``tiny``, a folder or an HF id).
        flags: MedMNIST flags of the study.
        size: image size of the files.
        missing_data: when an official file is absent and cannot be fetched: ``synthetic`` runs on a
            synthetic stand-in (said loudly, and recorded) or ``error`` stops with what to place where.
        seed: global seed.
        vision: stage 1 settings.
        support: Acc@1 / Pass@K settings.
        sft: stage 3 training.
        rl: stage 4 training.
        rl_from: which models RL starts from (``base``, ``sft``).
        transfer: measure every trained model on every flag.
        tau: the recipe's support threshold on Pass@k.
        seeds: training seeds: each SFT and RL model is trained once per seed (labels ``<model>-s<seed>`` after
            the first) and measured on the same questions, so the report's intervals cover training noise too.
        boundary_sft_steps: the support-boundary sweep's ladder: SFT budgets in optimizer steps between the
            base model (0) and the full SFT run, each followed by the same GRPO budget (empty: no sweep).
        image_options: the base model's image-processor settings in the support measurements (a model
            fragment's, with ``--model``; training stages take theirs from their configs).
        support_measure: what tau is compared with: Pass@k above chance (``adjusted``, the default: on 2-option
            questions a random letter has Pass@8 = 0.996) or raw Pass@k (``raw``).
        delta: the equivalence margin of the report's findings: a pooled change whose whole 95 % interval lies
            within +-delta reads "no effect larger than +-delta".
        answer_with: what the MedMNIST questions ask for in the answer block: the option's ``letter`` (the
            paper's format) or its ``text`` (no option-to-letter lookup; the CPU plan's choice, see
            docs/reproducing.md). Training and measuring both use it; a letter is always read as one.
    """

    name: str = "study"
    illustrative: bool = False
    model: str = "tiny"
    flags: list[str] = field(default_factory=lambda: ["breastmnist", "pneumoniamnist", "retinamnist"])
    size: int = 28
    missing_data: Literal["synthetic", "error"] = "synthetic"
    seed: int = 0
    vision: VisionPlan = field(default_factory=VisionPlan)
    support: SupportPlan = field(default_factory=SupportPlan)
    sft: TrainPlan = field(default_factory=lambda: TrainPlan("configs/sft.yaml"))
    rl: TrainPlan = field(default_factory=lambda: TrainPlan("configs/rl.yaml"))
    rl_from: list[Literal["base", "sft"]] = field(default_factory=lambda: ["base", "sft"])
    transfer: bool = True
    tau: float = 0.6
    support_measure: Literal["adjusted", "raw"] = "adjusted"
    boundary_sft_steps: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    image_options: dict[str, Any] | None = None
    delta: float = 0.05
    answer_with: Literal["letter", "text"] = "letter"

    @property
    def training_seeds(self) -> list[int]:
        """The seeds every SFT and RL model is trained with (``seeds``, else just ``seed``); the first is ``seed``'s
        role: the transfer, boundary and recipe stages use its models."""
        return list(dict.fromkeys(self.seeds)) or [self.seed]

    def flag_k(self, flag: str) -> int:
        """The k a flag's support is read at: ``support.k``, or with ``k: room`` the largest k of ``support.ks``
        whose chance level on the flag's questions is <= 0.75 (2 for 2 options, 4 for 4: questions offer
        min(4, classes) options; PMC-VQA offers 4)."""
        if self.support.k != "room":
            return int(self.support.k)
        options = 4 if flag.startswith("pmc:") else min(4, len(info(flag)["label"]))
        return room_k(options, self.support.ks)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (what ``plan.json`` holds)."""
        return asdict(self)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value has the type a plan field declares (ints pass for floats, never bools)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if cls is not TrainPlan else None
        if is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}{'.' if ':' in where else ':'}{name}")
        elif not _fits(value, hints[name]):
            raise ConfigError(f"{where}: {name} must be {_type_name(hints[name])}, got {value!r}; fix the plan file")
        kwargs[name] = value
    return cls(**kwargs)


def load_plan(path: str | Path) -> StudyPlan:
    """Read and validate a plan file; errors name the file and the offending key."""
    path = Path(path)
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study plan is a YAML mapping")
    for key in ("sft", "rl"):
        if isinstance(data.get(key), dict):
            data[key] = _build(TrainPlan, data[key], f"{path}:{key}")
    plan = _build(StudyPlan, data, str(path))
    bad = [f for f in plan.flags if f not in FLAGS_2D]
    if bad:
        raise ConfigError(f"{path}: unknown flags {bad}; choose from {list(FLAGS_2D)}")
    check_size(plan.size)
    try:  # a bad probe rate fails here, naming the file, rather than when the vision stage starts
        probe_heads(plan.vision.optimizer, plan.vision.lr)
    except ConfigError as err:
        raise ConfigError(f"{path}: vision.{err}") from None
    if plan.support.n < max(plan.support.ks) or plan.support.k not in [*plan.support.ks, "room"]:
        raise ConfigError(
            f"{path}: support needs n >= max(ks) and k among ks (n={plan.support.n}, ks={plan.support.ks})"
        )
    return plan


def claim_run_dir(run_dir: Path, plan: StudyPlan, command: str) -> None:
    """Make ``run_dir`` this plan's: write ``plan.json``, or refuse a folder made with a different plan.

    Finished steps are skipped by their outputs, so outputs made under other settings would be reused silently.
    """
    path = run_dir / "plan.json"
    wanted = json.loads(json.dumps(plan.to_dict()))  # JSON's view of it: tuples as lists, keys as strings
    if path.is_file() and json.loads(path.read_text()) != wanted:
        raise ConfigError(
            f"{command}: {run_dir} was made with a different plan or other settings; "
            f"pass another --out (or delete {run_dir}) to start afresh"
        )
    atomic_write_json(path, wanted)


def merge_nested(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: values of ``top`` win; dicts merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_nested(merged[key], value) if nested else value
    return merged


def with_model(plan: StudyPlan, model: str) -> StudyPlan:
    """``plan`` run on another base model: a model argument (``tiny:gemma3``, a folder, a hub id) or a model
    fragment (``configs/models/*.yaml``), whose other ``model.init_args`` (dtype, image options, LoRA, vision)
    go into both training stages. The vision stage probes the new model's tower (``vlm:<model>``) beside
    the plan's timm encoders, and the plan's name gains the model's, so its run folder is its own."""
    from dataclasses import replace

    from medrl.models.fragments import fragment_init_args, is_fragment

    settings: dict[str, Any] = {}
    if is_fragment(model):
        settings = dict(fragment_init_args(model))
        model = settings.pop("model")
    top = {"model": {"init_args": settings}} if settings else {}
    encoders = [spec for spec in plan.vision.encoders if spec.startswith("timm:")] + [f"vlm:{model}"]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("/", "--")).strip("-")
    return replace(
        plan,
        name=f"{plan.name}-{slug}",
        model=model,
        vision=replace(plan.vision, encoders=encoders),
        image_options=settings.get("image_options", plan.image_options),
        sft=replace(plan.sft, overrides=merge_nested(plan.sft.overrides, top)),
        rl=replace(plan.rl, overrides=merge_nested(plan.rl.overrides, top)),
    )
