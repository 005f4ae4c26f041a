"""MedMNIST 2D as a Lightning DataModule, in two modes.

``image``: ``{"image": uint8 [3, H, W], "label": int64 [L], "index": int}`` for encoders and probes (grey
images are repeated to three channels because every encoder medrl probes takes RGB).
``vqa``: ``{"image": PIL RGB, "prompt": str, "messages": list, "answer": letter, "options": {letter: text},
"label": int, "index": int, "flag": str}`` for VLMs; batches are lists of such dicts, because the
processor, not the collator, turns images and text into tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medrl.core.budget import PromptBudget
from medrl.core.errors import ConfigError
from medrl.data import vqa
from medrl.data.medmnist_files import (
    MedMNISTArrays,
    check_size,
    file_name,
    info,
    load_file,
    resolve_root,
    synthesize,
)
from medrl.data.resumable import ResumableLoader

log = logging.getLogger(__name__)
_SAID: set[tuple[str, int]] = set()  # (flag, num_options) warnings already given
Mode = Literal["image", "vqa"]
AnswerWith = Literal["letter", "text"]


@dataclass(frozen=True)
class VQAOptions:
    """How MedMNIST labels become multiple-choice questions.

    Args:
        num_options: options per question, gold included (None: every class).
        question: overrides the modality's question.
        instruction: overrides the think/answer instruction.
        system_prompt: an optional system message.
        answer_with: what the answer block holds, the option's ``letter`` (the paper's format) or its
            ``text``; it sets the default instruction and the SFT target.
    """

    num_options: int | None = 4
    question: str | None = None
    instruction: str | None = None
    system_prompt: str | None = None
    answer_with: AnswerWith = "letter"

    @property
    def instruction_text(self) -> str:
        """The instruction the prompts end with."""
        return self.instruction or vqa.instruction_for(self.answer_with)


def vqa_collate(batch: list[dict]) -> list[dict]:
    """VQA batches stay lists of dicts; the model's processor makes the tensors."""
    return batch


class MedMNISTDataset(Dataset):
    """One split of one MedMNIST 2D file, in ``image`` or ``vqa`` mode (see the module docstring)."""

    def __init__(
        self,
        arrays: MedMNISTArrays,
        flag: str,
        split: str,
        mode: Mode = "image",
        indices: np.ndarray | None = None,
        vqa_options: VQAOptions | None = None,
        seed: int = 0,
    ) -> None:
        self.flag, self.split, self.mode, self.seed = flag, split, mode, seed
        self.images = arrays.images[split]
        self.labels = arrays.labels[split]
        self.synthetic = arrays.synthetic
        self.meta = info(flag)
        self.multilabel = self.meta["task"].startswith("multi-label")
        indices = np.arange(len(self.images)) if indices is None else np.asarray(indices)
        self.vqa_options = vqa_options or VQAOptions()
        self.skipped_multi_finding = 0
        if mode == "vqa" and self.multilabel:
            # An MCQ needs one right answer: keep items with at most one positive finding (ours).
            positives = self.labels[indices].sum(1)
            self.skipped_multi_finding = int((positives > 1).sum())
            indices = indices[positives <= 1]
        self.indices = indices
        self._gold_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @cached_property
    def class_names(self) -> list[str]:
        """Option texts in label order (plus ``no finding`` for multi-label data in VQA mode)."""
        names = vqa.class_names(self.flag, self.meta["label"])
        return [*names, vqa.NO_FINDING] if self.multilabel else names

    def vqa_label(self, row: int) -> int:
        """The single class index an item is asked about (multi-label: its one finding, or ``no finding``)."""
        labels = self.labels[row]
        if self.multilabel:
            return int(labels.argmax()) if labels.any() else len(self.class_names) - 1
        return int(labels[0])

    def mcq(self, i: int) -> vqa.MCQ:
        """The multiple-choice question for item ``i`` (deterministic in the seed)."""
        opts = self.vqa_options
        k = len(self.class_names) if opts.num_options is None else min(opts.num_options, len(self.class_names))
        if self._gold_positions is None:
            self._gold_positions = vqa.gold_positions(len(self), k, self.seed)
        row = int(self.indices[i])
        return vqa.build_mcq(
            question=opts.question or vqa.QUESTIONS[self.flag],
            class_names=self.class_names,
            gold=self.vqa_label(row),
            gold_position=int(self._gold_positions[i]),
            num_options=k,
            seed=self.seed,
            index=row,
        )

    def longest_prompt(self) -> str:
        """The longest prompt any item can get: the question with the longest option texts (VQA mode)."""
        opts = self.vqa_options
        k = len(self.class_names) if opts.num_options is None else min(opts.num_options, len(self.class_names))
        longest = sorted(self.class_names, key=len, reverse=True)[:k]
        options = {chr(ord("A") + i): name for i, name in enumerate(longest)}
        prompt = vqa.format_prompt(opts.question or vqa.QUESTIONS[self.flag], options, opts.instruction_text)
        return vqa.readable_text(prompt, opts.system_prompt)

    def rgb(self, row: int) -> np.ndarray:
        """Image ``row`` as uint8 ``[H, W, 3]``."""
        image = self.images[row]
        return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        if self.mode == "image":
            image = torch.from_numpy(np.ascontiguousarray(self.rgb(row))).permute(2, 0, 1)  # [3, H, W] uint8
            return {"image": image, "label": torch.from_numpy(self.labels[row]), "index": row}
        question = self.mcq(i)
        opts = self.vqa_options
        prompt = vqa.format_prompt(question.question, question.options, opts.instruction_text)
        return {
            "image": Image.fromarray(self.rgb(row)),
            "prompt": prompt,
            "messages": vqa.chat_messages(prompt, opts.system_prompt),
            "answer": question.answer,
            "options": question.options,
            "answer_with": opts.answer_with,
            "label": self.vqa_label(row),
            "index": row,
            "flag": self.flag,
        }


class MedMNISTDataModule(L.LightningDataModule):
    """Any MedMNIST 2D dataset (12 flags, 28/64/128/224 px) as images or as multiple-choice VQA.

    Files are read from ``root`` (or ``$MEDRL_DATA_DIR``) under their official names; every split is
    validated before any is used. Metadata comes from the ``medmnist`` package's INFO.

    Args:
        flag: MedMNIST flag, e.g. ``pneumoniamnist``; the per-modality subclasses set it for you.
        size: image size in pixels (28, 64, 128 or 224).
        root: directory holding the .npz files; defaults to ``$MEDRL_DATA_DIR``.
        mode: ``image`` for encoders and probes, ``vqa`` for VLMs.
        synthetic: read ``<flag>.synthetic.npz`` (written on first use if absent) instead of the real file.
        batch_size: items per batch.
        num_workers: DataLoader worker processes.
        train_samples: use a seeded random subset of this many training items (None: all).
        val_samples: the same for validation.
        test_samples: the same for test.
        num_options: VQA options per question, gold included (None: every class).
        question: overrides the modality's VQA question.
        instruction: overrides the think/answer instruction.
        system_prompt: an optional system message for VQA.
        answer_with: the answer block holds the option's ``letter`` (the paper's format) or its ``text``
            (a direct function of the image: no lookup of the option's letter; the CPU plan uses it).
        seed: seeds subsets, distractors and option order.
    """

    default_flag: str | None = None

    def __init__(
        self,
        flag: str | None = None,
        size: int = 28,
        root: str | None = None,
        mode: Mode = "image",
        synthetic: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        train_samples: int | None = None,
        val_samples: int | None = None,
        test_samples: int | None = None,
        num_options: int | None = 4,
        question: str | None = None,
        instruction: str | None = None,
        system_prompt: str | None = None,
        answer_with: AnswerWith = "letter",
        seed: int = 0,
    ) -> None:
        super().__init__()
        flag = flag or self.default_flag
        if flag is None:
            raise ConfigError("MedMNISTDataModule needs a `flag` (e.g. pneumoniamnist)")
        classes = len(info(flag)["label"])
        check_size(size)
        if mode not in ("image", "vqa"):
            raise ConfigError(f"mode must be 'image' or 'vqa', got {mode!r}")
        if mode == "vqa" and num_options is not None and num_options < 2:
            raise ConfigError(f"num_options must be >= 2 (or None for every class), got {num_options}")
        if mode == "vqa" and num_options is not None and num_options > classes and (flag, num_options) not in _SAID:
            _SAID.add((flag, num_options))  # once per process: every DataModule of a study would repeat it
            log.warning(
                "num_options %d is more than %s's %d classes: its questions offer %d options (chance 1/%d)",
                num_options, flag, classes, classes, classes,
            )  # fmt: skip
        self.save_hyperparameters()
        self.flag, self.size, self.mode, self.synthetic = flag, size, mode, synthetic
        self.root = root
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        if answer_with not in ("letter", "text"):
            raise ConfigError(f"answer_with must be 'letter' or 'text', got {answer_with!r}")
        self.vqa_options = VQAOptions(num_options, question, instruction, system_prompt, answer_with)
        self.datasets: dict[str, MedMNISTDataset] = {}
        self._arrays: MedMNISTArrays | None = None

    @property
    def path(self) -> os.PathLike:
        """The file this DataModule reads."""
        return resolve_root(self.root) / file_name(self.flag, self.size, synthetic=self.synthetic)

    def prepare_data(self) -> None:
        """Write the synthetic file when one is asked for and absent; real files are never downloaded here."""
        if self.synthetic and not self.path.is_file():
            log.info("writing synthetic %s at %dpx to %s", self.flag, self.size, self.path.parent)
            synthesize(self.flag, self.size, self.path.parent, seed=self.seed)

    @property
    def arrays(self) -> MedMNISTArrays:
        """Every split of the file, loaded and validated once."""
        if self._arrays is None:
            self.prepare_data()
            self._arrays = load_file(self.path, self.flag, self.size)
        return self._arrays

    def dataset(self, split: str) -> MedMNISTDataset:
        """The dataset of one split (``train``, ``val`` or ``test``), built once."""
        if split not in self.datasets:
            n_total = len(self.arrays.images[split])
            limit = self.samples[split]
            indices = None
            if limit is not None and limit < n_total:
                # A seeded subset keeps class proportions on average and is the same on every rank.
                indices = np.sort(np.random.default_rng([self.seed, len(split)]).choice(n_total, limit, False))
            self.datasets[split] = MedMNISTDataset(
                self.arrays, self.flag, split, self.mode, indices, self.vqa_options, self.seed
            )
        return self.datasets[split]

    def apply_prompt_budget(self, budget: PromptBudget) -> None:
        """Check that every VQA prompt fits ``budget`` (the images all have one size, the questions one
        template, so the longest possible prompt decides for all); a flag that cannot fit is an error."""
        if self.mode != "vqa":
            return
        for split, dataset in self.datasets.items():
            image = self.size, self.size
            problem = budget.problem(dataset.longest_prompt(), [image])
            if problem is not None:
                raise ConfigError(
                    f"{self.flag} {split}: {problem[1]}, so every question would be dropped: shorten the "
                    "instruction or options, or raise max_prompt_length"
                )

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        collate = vqa_collate if self.mode == "vqa" else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # A seeded order per epoch that Lightning can checkpoint: a mid-epoch resume continues exactly.
        return ResumableLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=vqa_collate if self.mode == "vqa" else None,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @property
    def num_classes(self) -> int:
        """Number of label columns the probe head needs (14 for ChestMNIST, else the class count)."""
        return len(info(self.flag)["label"])

    @property
    def task(self) -> str:
        """The medmnist task string: ``multi-class``, ``binary-class``, ``multi-label, binary-class``, ..."""
        return info(self.flag)["task"]
