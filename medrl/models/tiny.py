"""What every family's offline tiny model is built from: an in-memory tokenizer and an atomic model cache.

Each family's adapter (:mod:`medrl.models.families`) builds its ``tiny:<family>`` model from its real
transformers classes with :func:`build_tokenizer` (a byte-level BPE trained offline on medrl's own prompt
vocabulary, carrying the family's special tokens) and saves it once with :func:`cached_model` under the medrl
cache, so transformers, PEFT and vLLM all load it like any local model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medrl.core.env import CACHE_ENV, cache_dir
from medrl.core.errors import UserError
from medrl.core.io import is_no_space, no_space_error, umask_modes
from medrl.models.tiny_corpus import CORPUS

# Bump when anything below changes what gets built, so stale cached copies are rebuilt.
TINY_VERSION = 1


def build_tokenizer(
    special_tokens: Sequence[str],
    eos: str,
    pad: str,
    chat_template: str,
    newline_tokens: bool = False,
    vocab_size: int = 1024,
    **kwargs: Any,
):
    """A ``PreTrainedTokenizerFast`` trained offline, byte-level (every byte has a token: no UNK, ever).

    Args:
        special_tokens: the family's special tokens, ids 0.. in this order (the first is the padding token
            only if ``pad`` names it).
        eos: the end-of-sequence token; pad: the padding token.
        chat_template: the family's chat template (Jinja).
        newline_tokens: add ``"\\n"`` to ``"\\n\\n\\n\\n"`` as whole tokens, as SentencePiece vocabularies
            (Gemma's) have them and vLLM's Gemma 3 processor looks them up.
        kwargs: more tokenizer arguments: ``bos_token``, and the model-specific token attributes the family's
            processor reads (``boi_token=...``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    others = [t for t in special_tokens if t != pad]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                     additional_special_tokens=others, padding_side="left", model_max_length=4096,
                                     **kwargs)  # fmt: skip
    if newline_tokens:
        hf_tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in (4, 3, 2, 1)])
    hf_tok.chat_template = chat_template
    return hf_tok


def random_model(model_class: type, config: Any, seed: int, tokenizer: Any, end_token: str | None = None):
    """``model_class(config)`` with weights drawn from ``seed`` (the caller's RNG state is left as it was), in
    eval mode, generating with the tokenizer's padding and ``end_token`` (default: its EOS) as the end."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = (
        tokenizer.eos_token_id if end_token is None else tokenizer.convert_tokens_to_ids(end_token)
    )
    return model.eval()


def cached_model(
    name: str, build: Callable[[], tuple[Any, Any, dict[str, str]]], root: str | os.PathLike | None = None
) -> Path:
    """``root/name`` (default root: the medrl cache's ``models/``), made on first use by ``build()`` ->
    ``(model, processor, extra files)``; the folder appears whole, in one rename."""
    target = (Path(root) if root is not None else cache_dir() / "models") / name

    def write(tmp: Path) -> None:
        model, processor, extra = build()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for file, text in extra.items():
            (tmp / file).write_text(text)

    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return build_folder(target, write, name, uses_env_cache=root is None)


def build_folder(target: Path, write: Callable[[Path], None], what: str, uses_env_cache: bool = True) -> Path:
    """Make ``target`` by ``write(tmp)`` into a temp folder beside it, then one rename: a crash or a kill
    leaves no half-written folder that a later run would load; if another process got there first, its copy
    is kept."""
    base = target.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{target.name}."))
    except PermissionError as exc:
        where = f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if uses_env_cache and os.environ.get(CACHE_ENV) else str(base)
        raise UserError(
            f"cannot build {what} in {base}: {where} is not writable; point {CACHE_ENV} at a folder you "
            f"can write (e.g. `export {CACHE_ENV}=$HOME/.cache/medrl`)"
        ) from exc
    try:
        write(tmp)
        umask_modes(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(exc):  # how much the whole folder needs is not known before it is written
            raise no_space_error(base, what if what == target.name else f"{what} ({target.name})", 0) from exc
        raise
    return target
