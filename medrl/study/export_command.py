"""``medrl export``: a trained model into a clean folder with its model card, and onto the hub if asked.

The source is what training left: a run folder (its newest ``last.hf``), a checkpoint (the ``.hf`` beside
it), an export folder (``NAME.hf``), or a model folder. The output holds one loadable model (``merged``, full
``model`` or ``adapter``) and its ``README.md``. ``--push_to_hub REPO_ID`` uploads it (a private repository
unless ``--private false``) through ``huggingface_hub``; offline or without a token it says so in one line and
the folder stays.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Literal

from medrl.core.env import is_offline
from medrl.core.errors import ConfigError, UserError
from medrl.core.io import atomic_write_text
from medrl.models.model_card import CARD, CardFacts, as_merged, is_medrl_card, public_name, render_card

Part = Literal["auto", "merged", "model", "adapter"]
PARTS = ("merged", "model", "adapter")  # what `auto` picks, in this order


def find_export(source: str | Path) -> Path:
    """The export folder (``NAME.hf``) or model folder a source names (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        path = path.with_name(path.stem + ".hf")
        if not path.is_dir():
            raise UserError(f"{source}: no {path.name} beside the checkpoint (it was saved without HFCheckpoint)")
        return path
    if not path.is_dir():
        raise UserError(f"{source}: no such run folder, checkpoint or model folder")
    if path.suffix == ".hf" or any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        return path
    exports = sorted(path.rglob("last.hf"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise UserError(f"{source}: no last.hf under it; pass a run folder written by `medrl fit`, or an export")
    return exports[-1]


def pick_part(export: Path, part: Part) -> tuple[Path, str]:
    """``(folder, kind)``: the part of an export to publish (a plain model folder is its own part)."""
    if (export / "config.json").is_file():
        return export, "model"
    if (export / "adapter_config.json").is_file():
        return export, "adapter"
    present = [name for name in PARTS if (export / name).is_dir()]
    chosen = present[0] if part == "auto" and present else part
    if chosen == "merged" and "merged" not in present and "adapter" in present:
        return export / "adapter", "merge"  # merged on export, onto the base the adapter records
    if chosen not in present:
        raise ConfigError(f"{export} has no {chosen}/ (it has: {', '.join(present) or 'nothing exported'})")
    return export / chosen, chosen


def _public_base(config: Path) -> None:
    """A published adapter names its base by hub id or name, not by a folder on this machine (PEFT records
    the path the base was loaded from); load it with ``PeftModel.from_pretrained(base, folder)``."""
    data = json.loads(config.read_text())
    recorded = str(data.get("base_model_name_or_path") or "")
    if recorded and Path(recorded).is_absolute():
        data["base_model_name_or_path"] = public_name(recorded)
        atomic_write_text(config, json.dumps(data, indent=2) + "\n")


def upload_plan(folder: Path, repo_id: str) -> tuple[list[str], str]:
    """``(files, commit message)`` of a push: every file of ``folder`` by its path inside it."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    title = next((line[2:] for line in (folder / CARD).read_text().splitlines() if line.startswith("# ")), "model")
    return files, f"medrl export: {title} ({len(files)} files)"


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Upload ``folder`` to ``repo_id``; the repository's URL. One line (UserError) when it cannot."""
    keep = f"the folder stays at {folder}; push it later with `medrl export {folder} --push_to_hub {repo_id}`"
    if is_offline():
        raise UserError(f"not pushed to {repo_id}: offline mode is set (HF_HUB_OFFLINE / MEDRL_OFFLINE); {keep}")
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise UserError(f"not pushed to {repo_id}: no Hugging Face token (`hf auth login` or HF_TOKEN); {keep}")
    _, message = upload_plan(folder, repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors come in many types
        raise UserError(f"not pushed to {repo_id}: {type(exc).__name__}: {exc}; {keep}") from exc
    return str(url)


def export(
    source: str,
    out: str | None = None,
    part: Part = "auto",
    push_to_hub: str | None = None,
    private: bool = True,
    dry_run: bool = False,
) -> int:
    """Copy a trained model into a clean folder with its model card, and push it to the hub if asked.

    Args:
        source: a run folder (its newest last.hf), a .ckpt (the .hf beside it), an export (NAME.hf) or a model folder.
        out: the folder to write (default: `<source's export>-export` beside it).
        part: what to publish from an export: auto (merged, else model, else adapter), merged (an adapter is
            merged onto its recorded base now), model or adapter.
        push_to_hub: a hub repository id (owner/name) to upload the folder to.
        private: create the hub repository private.
        dry_run: print the upload plan (files and commit message) and push nothing.
    """
    from medrl.models.hub import merge_adapter
    from medrl.models.lora import write_folder

    export_dir = find_export(source)
    folder, kind = pick_part(export_dir, part)
    target = Path(out) if out else export_dir.with_name(export_dir.name.removesuffix(".hf") + "-export")
    if target.resolve() != folder.resolve():
        card = (folder / CARD).read_text() if (folder / CARD).is_file() else None
        card = card if card and is_medrl_card(card) else None  # PEFT's stub names local paths: never publish it
        if kind == "merge":
            card = card and as_merged(card)
            merge_adapter(folder, target, card=card)
        else:
            write_folder(target, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))
        if kind == "adapter":
            _public_base(target / "adapter_config.json")
        if card is None:  # an export from before cards: say at least what it is
            facts = CardFacts(method="training", kind=kind.replace("merge", "merged"))
            atomic_write_text(target / CARD, render_card(facts))
    print(f"medrl export: {folder} -> {target}", file=sys.stderr)
    if push_to_hub:
        files, message = upload_plan(target, push_to_hub)
        if dry_run:
            print(f"would push {len(files)} files to {push_to_hub} ({'private' if private else 'public'}): {message}")
            print("\n".join(f"  {name}" for name in files))
            return 0
        print(f"pushed to {push(target, push_to_hub, private)}")
    return 0
