"""Every YAML under configs/ and callbacks/ parses against the code, so no config can drift from it.

Full experiment configs (configs/*.yaml) parse alone; fragments (configs/strategy/*.yaml, callbacks/*.yaml)
parse when added after a full config, which is how users combine them; study plans (configs/study/*.yaml)
load as plans and their training configs parse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medrl.study.configs import check_configs

REPO = Path(__file__).resolve().parents[1]
FULL = sorted((REPO / "configs").glob("*.yaml"))
FRAGMENTS = sorted((REPO / "configs" / "strategy").glob("*.yaml")) + sorted((REPO / "callbacks").glob("*.yaml"))
FRAGMENTS += sorted((REPO / "configs" / "loggers").glob("*.yaml")) + sorted(
    (REPO / "configs" / "models").glob("*.yaml")
)
STUDY_PLANS = sorted((REPO / "configs" / "study").glob("*.yaml"))
# The config fragments are checked on top of; the SFT config is the most general (a VLM, VQA data).
BASE = next((p for p in FULL if p.name == "sft.yaml"), FULL[0] if FULL else None)


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_there_are_configs() -> None:
    assert FULL, "configs/ holds no experiment config"


@pytest.mark.parametrize("path", FULL, ids=_id)
def test_full_config_parses(path: Path) -> None:
    config = check_configs([str(path)])
    assert config.fit.model is not None and config.fit.data is not None
    assert yaml.safe_load(path.read_text())  # and it is not empty


@pytest.mark.parametrize("path", FRAGMENTS, ids=_id)
def test_fragment_parses_on_top_of_a_full_config(path: Path) -> None:
    config = check_configs([str(BASE), str(path)])
    fragment = yaml.safe_load(path.read_text())
    assert fragment, f"{path} is empty"
    if "trainer" in fragment and "callbacks" in fragment["trainer"]:
        paths = {c.class_path for c in config.fit.trainer.callbacks}
        assert {c["class_path"] for c in fragment["trainer"]["callbacks"]} <= paths


def test_a_bad_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.read_text() + "\ntrainer:\n  max_epochz: 3\n")
    with pytest.raises(SystemExit):
        check_configs([str(bad)])


def test_every_config_file_is_covered() -> None:
    every = set((REPO / "configs").rglob("*.yaml")) | set((REPO / "callbacks").rglob("*.yaml"))
    assert every == set(FULL) | set(FRAGMENTS) | set(STUDY_PLANS)


@pytest.mark.parametrize("path", STUDY_PLANS, ids=_id)
def test_study_plan_loads_and_its_configs_parse(path: Path, tmp_path: Path) -> None:
    import yaml

    from medrl.study.plan import load_plan

    plan = load_plan(path)
    for name, train in (("sft", plan.sft), ("rl", plan.rl)):
        # The plan's overrides go on top of the experiment config, as the study passes them to `medrl fit`.
        override = tmp_path / f"{name}.yaml"
        override.write_text(yaml.safe_dump(train.overrides))
        config = check_configs([str(REPO / train.config), str(override)])
        merged = config.fit if "fit" in config else config
        for key, value in train.overrides.get("model", {}).get("init_args", {}).items():
            got = merged.model.init_args[key]
            for field, expected in value.items() if isinstance(value, dict) else [(None, value)]:
                assert (got if field is None else got[field]) == expected, (name, key, field)


def test_every_grpo_option_is_settable_from_yaml(tmp_path: Path) -> None:
    import yaml

    frontier = {
        "sampling": {"overlong_buffer": 8, "max_prompt_length": 1000},
        "loss": {"advantage_estimator": "grpo_passk", "importance_sampling": "sequence", "mismatch_correction": "mis",
                 "mismatch_level": "sequence", "mismatch_cap": 3.0, "mismatch_low": 0.5, "kl_estimator": "low_var_kl",
                 "kl_bias_correction": True, "entropy_coef": 0.01, "top_entropy_quantile": 0.2,
                 "mask_truncated_completions": True},
        "engine": {"name": "vllm", "options": {"sleep_mode": True, "enforce_eager": False,
                                               "max_num_batched_tokens": 4096}},
        "rewards": {"accuracy": 1.0, "format": 1.0, "overlong": 1.0},
        "log_completions_every": 10,
    }  # fmt: skip
    override = tmp_path / "frontier.yaml"
    override.write_text(yaml.safe_dump({"model": {"init_args": frontier}}))
    init = check_configs([str(REPO / "configs" / "rl.yaml"), str(override)]).fit.model.init_args
    assert init.loss.importance_sampling == "sequence" and init.loss.mismatch_low == 0.5
    assert init.optim.micro_batch_size == 16  # untouched groups keep rl.yaml's
    assert init.engine.options["max_num_batched_tokens"] == 4096 and init.rewards["overlong"] == 1.0
