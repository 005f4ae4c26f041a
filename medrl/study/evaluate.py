"""``medrl eval``: Acc@1 / Pass@K of a model on MedMNIST multiple-choice VQA, zero-shot."""

from __future__ import annotations

from typing import Literal

from medrl.core.errors import ConfigError
from medrl.core.prompts import PASS_AT_K_TEMPERATURE, PASS_AT_K_TOP_P


def evaluate_command(
    model: str = "tiny",
    flags: list[str] | None = None,
    split: Literal["val", "test"] = "test",
    questions: int | None = 64,
    root: str | None = None,
    size: int = 28,
    synthetic: bool = False,
    num_options: int | None = 4,
    engine: Literal["hf", "vllm"] = "hf",
    n: int = 16,
    ks: list[int] | None = None,
    temperature: float = PASS_AT_K_TEMPERATURE,
    top_p: float = PASS_AT_K_TOP_P,
    top_k: int = 0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    out: str = "runs/eval",
    keep_texts: bool = False,
    image_ablation: bool = True,
    answer_with: Literal["letter", "text"] = "letter",
) -> int:
    """Acc@1 and Pass@k of a model on MedMNIST multiple-choice VQA, zero-shot.

    Writes OUT/questions.jsonl, OUT/summary.json, OUT/summary.md (printed) and OUT/pass_at_k.png.

    Args:
        model: ``tiny``, a local model folder, a Hugging Face id, or a model fragment (configs/models/*.yaml).
        flags: MedMNIST flags to evaluate (default: pneumoniamnist); several give a row per modality.
        split: which split's questions to ask.
        questions: questions per flag (a seeded subset; None: the whole split).
        root: folder of the MedMNIST files (default: $MEDRL_DATA_DIR).
        size: image size of the files.
        synthetic: use synthetic files instead of the official ones (offline smoke runs).
        num_options: options per question, gold included (None: every class).
        engine: ``hf`` (transformers generate) or ``vllm``.
        n: samples per question.
        ks: the k of Pass@k (default: powers of two up to n, and n).
        temperature: sampling temperature (the study's 0.7).
        top_p: nucleus mass (the study's 0.9).
        top_k: top-k cut (0: off).
        max_new_tokens: completion length limit.
        seed: seeds the questions' options and the sampling.
        batch_size: questions per engine call.
        out: output folder.
        keep_texts: also store every sampled completion's text in the JSONL.
        image_ablation: also answer each question greedily with another question's image (seeded; one more
            greedy pass) and report image reliance, Acc@1 with the right image minus with the swapped one,
            with its 95 % interval: a model that does not read the image scores 0.
        answer_with: ask for the option's ``letter`` (the paper's format) or its ``text`` in the answer
            block (for models trained that way, e.g. the CPU study's); a letter is always read as one.
    """
    # Imported here: torch and Lightning come with them, and `medrl eval --help` needs neither.
    from medrl.data.medmnist import MedMNISTDataModule
    from medrl.evaluation import default_ks, evaluate_items, write_outputs
    from medrl.metrics.intervals import reliance_sentence
    from medrl.models.budget import model_prompt_budget
    from medrl.models.fragments import model_and_dtype
    from medrl.rollout.factory import open_engine
    from medrl.rollout.types import Item, SamplingParams

    model, _ = model_and_dtype(model)  # a configs/models/*.yaml fragment names the model
    flags = flags or ["pneumoniamnist"]
    ks = sorted(set(ks)) if ks else default_ks(n)
    if max(ks) > n:
        raise ConfigError(f"ks {ks} go above n={n}: pass@k needs k <= n samples")
    items: list[Item] = []
    budget = model_prompt_budget(model, max_new_tokens)
    for flag in flags:
        dm = MedMNISTDataModule(
            flag=flag,
            size=size,
            root=root,
            mode="vqa",
            synthetic=synthetic,
            num_options=num_options,
            answer_with=answer_with,
            seed=seed,
            **{f"{split}_samples": questions},
        )
        dataset = dm.dataset(split)
        dm.apply_prompt_budget(budget)
        items.extend(dataset[i] for i in range(len(dataset)))
    rollout = open_engine(engine, model, seed)
    params = SamplingParams(
        n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed
    )
    try:
        rows, summary = evaluate_items(rollout, items, params, ks, batch_size, image_ablation, keep_texts)
    finally:
        rollout.close()
    meta = {"model": model, "engine": engine, "split": split, "flags": flags, "n": n, "temperature": temperature}
    meta |= {"top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "answer_with": answer_with}
    folder = write_outputs(out, rows, summary, ks, meta)
    print((folder / "summary.md").read_text(), end="")
    if image_ablation:
        for group, metrics in summary.items():
            print(f"{group}: {reliance_sentence(metrics)}")
    print(f"wrote {folder}/questions.jsonl, summary.json, summary.md, pass_at_k.png")
    return 0
