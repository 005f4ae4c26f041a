"""One process and many agree: SFT and GRPO under DDP and FSDP2 on CPU (gloo), and sharded checkpoints resume.

The multi-process runs are real ``medrl fit`` runs of configs/sft.yaml and configs/rl.yaml with
configs/strategy/{ddp,fsdp}.yaml, launched by Lightning itself (it starts the second process by running the
same command again) from tests/dist_worker.py in a subprocess, which records each process's loss, gradients
and weights. The one-process reference runs the same worker in this process.

GRPO runs on fixed rollouts (tests/dist_worker.py: FixedRollouts): each process seeds its sampling with its
rank, so sampled completions, and with them the loss, would differ between one process and two.

How one step can agree: the two processes' first batches are exactly the one process's first batch (the
sampler hands out one permutation round robin), groups stay within a process, and the normalisers that
span the batch (dapo's token count, the ``batch`` advantage scale) are reduced across processes. DDP and
FSDP average the processes' gradients, so the one-process loss is the mean of the processes' losses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
SFT_LR = 0.002  # configs/sft.yaml
RL_LR = 1.0e-4  # configs/rl.yaml
COMMON = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.limit_val_batches=0",
    "--trainer.callbacks=[]",
    "--data.init_args.train_samples=8",
]
# Both normalisers that span the batch: dapo's token count and the batch-wide advantage std.
GRPO = ["--model.init_args.loss.aggregation=dapo", "--model.init_args.loss.advantage_scale=batch", "--fixed-rollouts"]
# Micro-batches of 2 rows (the reference runs one of 16): the processes then run different numbers of CARE
# scoring forwards, which FSDP must keep in step, and the micro-batch losses must add up to the batch's.
SMALL_MICRO_BATCHES = ["--model.init_args.optim.micro_batch_size=2"]  # GRPO's


def _args(
    config: str, data, out: Path, processes: int, strategy: str | None, steps: int, extra: list[str]
) -> list[str]:
    args = ["--out", str(out), "--config", str(REPO / "configs" / config), *data.cli()]
    if strategy:
        args += ["--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml")]
        args += ["--trainer.accelerator=cpu", f"--trainer.devices={processes}"]
    batch = 4 // processes  # the same global batch of 4 questions
    return args + COMMON + [f"--trainer.max_steps={steps}", f"--data.init_args.batch_size={batch}", *extra]


def _launch(args: list[str], out: Path, timeout: int = 600) -> list[dict]:
    """Run the worker in a subprocess (Lightning starts the other processes); return each rank's record."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with socket.socket() as s:  # a free port, so concurrent test runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    done = subprocess.run(
        [sys.executable, str(WORKER), *args, f"--trainer.default_root_dir={out}"],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return _records(out)


def _records(out: Path) -> list[dict]:
    files = sorted(out.glob("rank*.pt"))
    assert files, f"no records in {out}"
    return [torch.load(f, weights_only=True) for f in files]


def _run_here(args: list[str], out: Path) -> dict:
    """The one-process reference, in this process (the same worker code, no second interpreter to start)."""
    import dist_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dist_worker.run([*args, f"--trainer.default_root_dir={out}"])
    finally:
        torch.set_num_threads(threads)
    return _records(out)[0]


def _assert_same_step(one: dict, many: list[dict], lr: float) -> None:
    """The processes together trained on the one process's batch, with its loss, gradients and update."""
    assert [r["world_size"] for r in many] == [len(many)] * len(many)
    assert sorted(i for r in many for i in r["indices"][0]) == sorted(one["indices"][0])
    if one["tokens"] is not None:
        # SFT: DDP averages the processes' per-token means, which is the global mean only for equal token
        # counts; multiple-choice answers all have the same length, so the counts are equal here.
        assert sum(r["tokens"] for r in many) == one["tokens"]
        assert len({r["tokens"] for r in many}) == 1
    mean_loss = sum(r["loss"] for r in many) / len(many)
    assert mean_loss == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert one["grads"] and set(one["grads"]) == set(one["weights"][0])
    for record in many:
        for name, grad in one["grads"].items():
            torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        step = {n: one["weights"][1][n] - w for n, w in one["weights"][0].items()}
        assert max(d.abs().max().item() for d in step.values()) > lr / 2  # the step moved the weights
        for name, delta in step.items():
            # AdamW's first step is about lr x sign(grad), so where a gradient is ~0 float32 noise can move an
            # element by a fraction of lr (measured on the real PneumoniaMNIST files: 4 % of lr, on 1 of
            # 32,768 elements of one SFT weight); 10 % of lr is far below any real difference (a whole lr).
            torch.testing.assert_close(
                record["weights"][1][name] - one["weights"][0][name], delta, rtol=0, atol=lr / 10
            )


@pytest.fixture(scope="module")
def grpo_one_process(tmp_path_factory, medmnist) -> dict:
    out = tmp_path_factory.mktemp("grpo1") / "run"
    return _run_here(_args("rl.yaml", medmnist, out, 1, None, 1, GRPO), out)


@pytest.fixture(scope="module")
def sft_one_process(tmp_path_factory, medmnist) -> dict:
    out = tmp_path_factory.mktemp("sft1") / "run"
    record = _run_here([*_args("sft.yaml", medmnist, out, 1, None, 2, []), "--checkpoint-every-step"], out)
    return record | {"dir": out}


# ------------------------------------------------------------------------------------------- DDP


def test_grpo_step_is_the_same_on_one_and_two_ddp_processes(grpo_one_process, medmnist, tmp_path) -> None:
    # configs/rl.yaml + configs/strategy/ddp.yaml, CARE on, dapo, batch-scaled advantages. About 30 s of CPU
    # in all (two interpreters importing torch, transformers and Lightning); on a busy machine, minutes.
    many = _launch(_args("rl.yaml", medmnist, tmp_path / "run", 2, "ddp", 1, GRPO), tmp_path / "run")
    assert len(many) == 2
    _assert_same_step(grpo_one_process, many, RL_LR)


# The frontier options whose statistics span processes: GSPO ratios, the KL against the reloaded initial
# weights with its bias correction, and an entropy bonus on the top half of tokens by entropy (the quantile is
# pooled over processes).
FRONTIER = ["--model.init_args.loss.importance_sampling=sequence", "--model.init_args.loss.beta=0.05",
            "--model.init_args.loss.kl_bias_correction=true", "--model.init_args.loss.entropy_coef=0.01",
            "--model.init_args.loss.top_entropy_quantile=0.5"]  # fmt: skip


@pytest.mark.slow  # a one-process run and a 2-process launch: 1-2 minutes on 2 shared cores
def test_grpo_step_with_the_frontier_options_is_the_same_on_one_and_two_processes(medmnist, tmp_path) -> None:
    one = _run_here(_args("rl.yaml", medmnist, tmp_path / "one", 1, None, 1, [*GRPO, *FRONTIER]), tmp_path / "one")
    many = _launch(_args("rl.yaml", medmnist, tmp_path / "run", 2, "ddp", 1, [*GRPO, *FRONTIER]), tmp_path / "run")
    _assert_same_step(one, many, RL_LR)


@pytest.mark.slow  # a 2-process launch: 30-90 s on 2 shared cores
def test_sft_step_is_the_same_on_one_and_two_ddp_processes(sft_one_process, medmnist, tmp_path) -> None:
    many = _launch(_args("sft.yaml", medmnist, tmp_path / "run", 2, "ddp", 1, []), tmp_path / "run")
    _assert_same_step(sft_one_process, many, SFT_LR)


# ------------------------------------------------------------------------------------------ FSDP2


def _resume_matches(straight: list[dict], run: Path, args: list[str]) -> None:
    """Resumed from the straight run's step-1 shards, step 2 lands exactly on the straight run's step 2."""
    shards = run.parent / "straight" / "ckpt" / "epoch=0-step=1.ckpt"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2  # one file of shards per process
    resumed = _launch([*args, "--ckpt_path", str(shards)], run)
    for before, after in zip(straight, resumed, strict=True):
        assert after["start_step"] == 1 and after["indices"] == before["indices"][1:]
        for name, weight in before["weights"][2].items():
            assert torch.equal(after["weights"][2][name], weight), name


@pytest.mark.slow  # three 2-process launches: 3-5 minutes on 2 shared cores
def test_sft_under_fsdp2_matches_one_process_and_resumes(sft_one_process, medmnist, tmp_path) -> None:
    args = _args("sft.yaml", medmnist, tmp_path / "straight", 2, "fsdp", 2, [])
    straight = _launch([*args, "--checkpoint-every-step"], tmp_path / "straight")
    _assert_same_step(sft_one_process, straight, SFT_LR)
    _resume_matches(straight, tmp_path / "resumed", _args("sft.yaml", medmnist, tmp_path / "resumed", 2, "fsdp", 2, []))
    # A one-process checkpoint (one file) resumes on two FSDP processes: the same weights to start from, and
    # AdamW's moments carried over, so step 2 lands where the one-process run's step 2 did.
    one_file = sft_one_process["dir"] / "ckpt" / "epoch=0-step=1.ckpt"
    run = tmp_path / "from_one_process"
    moved = _launch([*_args("sft.yaml", medmnist, run, 2, "fsdp", 2, []), "--ckpt_path", str(one_file)], run)
    for record in moved:
        assert record["start_step"] == 1
        for name, weight in sft_one_process["weights"][1].items():
            assert torch.equal(record["weights"][1][name], weight), name
            torch.testing.assert_close(
                record["weights"][2][name], sft_one_process["weights"][2][name], rtol=0, atol=SFT_LR / 50
            )


@pytest.mark.slow  # a one-process run and a 2-process launch: 1-2 minutes each on 2 shared cores
@pytest.mark.parametrize("tiny", ["tiny:smolvlm", "tiny:gemma3", "tiny:internvl", "tiny:qwen3_vl"])
def test_sft_under_fsdp2_matches_one_process_on_every_other_family(tiny: str, medmnist, tmp_path) -> None:
    """Each family's tiny model: FSDP2 shards its own _no_split_modules (decoder layers, vision layers)."""
    family = [f"--model.init_args.model={tiny}"]
    one = _run_here(_args("sft.yaml", medmnist, tmp_path / "one", 1, None, 1, family), tmp_path / "one")
    many = _launch(_args("sft.yaml", medmnist, tmp_path / "two", 2, "fsdp", 1, family), tmp_path / "two")
    _assert_same_step(one, many, SFT_LR)


@pytest.mark.slow  # two 2-process launches: 2-3 minutes on 2 shared cores
def test_grpo_under_fsdp2_matches_one_process_and_resumes(grpo_one_process, medmnist, tmp_path) -> None:
    # The EMA reference is updated every step, so step 2's CARE scoring needs the EMA the checkpoint restored.
    extra = [*GRPO, *SMALL_MICRO_BATCHES, "--model.init_args.care.ema_every=1"]
    args = _args("rl.yaml", medmnist, tmp_path / "straight", 2, "fsdp", 2, extra)
    straight = _launch([*args, "--checkpoint-every-step"], tmp_path / "straight")
    _assert_same_step(grpo_one_process, straight, RL_LR)
    _resume_matches(
        straight, tmp_path / "resumed", _args("rl.yaml", medmnist, tmp_path / "resumed", 2, "fsdp", 2, extra)
    )


# --------------------------------------------------------------------- the pieces, on 2 processes


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


class _Toy(nn.Module):
    _no_split_modules = ["_Block"]  # what transformers models declare; the wrap policy reads it

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _pieces_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from medrl.models.sharding import gathered, shard_model
    from medrl.rl.distributed import gather_objects, global_max, global_min, global_std
    from medrl.rl.ema import EMAReference
    from medrl.rollout.weights import policy_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {}
    values = torch.arange(3.0 + rank * 2) * (rank + 1)  # 3 values on rank 0, 5 on rank 1
    result["std"] = global_std(values).item()
    result["min_max"] = (global_min(rank + 2), global_max(rank + 2))
    result["gathered"] = gather_objects({"rank": rank})

    torch.manual_seed(0)
    model = _Toy()
    whole = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMAReference(model, decay=0.5, every=1)
    shard_model(model, init_device_mesh("cpu", (world,)))
    ema.shard_like(model)
    result["sharded"] = all(isinstance(p, DTensor) for p in model.parameters()) and all(
        isinstance(s, DTensor) for s in ema.shadow.values()
    )
    # The policy weights an engine receives are whole, named as before sharding.
    pushed = dict(policy_weights(model))
    result["pushed_whole"] = set(pushed) == set(whole) and all(torch.equal(pushed[n], whole[n]) for n in whole)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the policy moves by +1 everywhere; its average stays at the initial weights
    x = torch.ones(2, 4)
    with torch.no_grad():
        policy_out = model(x)
        with ema.swapped_in(model):
            ema_out = model(x)
        result["restored"] = torch.equal(model(x), policy_out)
    reference = _Toy()
    reference.load_state_dict(whole)
    result["ema_scores_initial"] = torch.allclose(ema_out, reference(x).detach(), atol=1e-6)
    ema.update(model)  # average of initial and initial + 1 (decay 0.5): initial + 0.5
    state = ema.state_dict()
    result["ema_state_whole"] = all(torch.allclose(state["shadow"][n], whole[n] + 0.5) for n in whole)
    restored = EMAReference(_Toy(), decay=0.9, every=3).shard_like(model)
    restored.load_state_dict(state)
    result["ema_state_loads_sharded"] = all(
        isinstance(s, DTensor) and torch.allclose(s.full_tensor(), whole[n] + 0.5) for n, s in restored.shadow.items()
    )
    with gathered(model):
        result["gathered_whole"] = not any(isinstance(p, DTensor) for p in model.blocks[0].parameters())
        model(x)  # one forward inside: no further gathers, and the weights stay whole
        result["stays_whole"] = not isinstance(model.blocks[1].proj.weight, DTensor)
    result["resharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    torch.save(result, f"{out_dir}/pieces{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing lightning: 30 s of CPU, 1-2 minutes on busy cores
def test_distributed_pieces_on_two_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pieces_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    # torch.std of the 8 values both processes hold together: 0, 1, 2 and 0, 2, 4, 6, 8.
    expected = torch.tensor([0.0, 1, 2, 0, 2, 4, 6, 8]).std().item()
    for rank in range(2):
        r = torch.load(tmp_path / f"pieces{rank}.pt", weights_only=True)
        assert r["std"] == pytest.approx(expected, rel=1e-6)
        assert r["min_max"] == (2, 3) and r["gathered"] == [{"rank": 0}, {"rank": 1}]
        flags = ["sharded", "pushed_whole", "restored", "ema_scores_initial", "ema_state_whole"]
        flags += ["ema_state_loads_sharded", "gathered_whole", "stays_whole", "resharded"]
        assert {f: r[f] for f in flags} == dict.fromkeys(flags, True)
