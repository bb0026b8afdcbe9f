"""FSDP2 (--parallel fsdp) with real torch.distributed (gloo, 2 CPU processes under torchrun):
2 ranks x grad_accum 1 log the losses and gradient norms of 1 process x grad_accum 2 on the same
global batches (see tests/test_ddp.py for why the batches compose), with the torch backends and
with the Triton kernels under the interpreter. The sharded (DCP) checkpoints: resume is bitwise
at the same world size, a 2-rank checkpoint resumes with 1 rank, and `sample`, `eval`, `export`
read one directly; `export --consolidate` writes it as a single file that resumes a plain run.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _util import assert_rel_close
from test_train import argv_of, metrics, prepare_tiny, run, tiny_flags, train_log

from tritongpt.cli import main
from tritongpt.model.gpt import GPT
from tritongpt.train import checkpoint

STEPS = 6


def torchrun(flags: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tritongpt.cli", "train", *argv_of(flags)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def fsdp_flags(data: Path, out: Path, **overrides) -> dict[str, str]:
    settings = dict(max_steps=STEPS, batch_size=2, grad_accum=1, ckpt_interval=3, keep_ckpts=3, parallel="fsdp",
                    dropout=0.1)
    return tiny_flags(data, out, **{**settings, **overrides})


def assert_losses_close(a: Path, b: Path, steps: list[int]) -> None:
    """The losses of runs `a` and `b` agree within fp32 tolerance. (Not the logged gradient norms:
    on the CPU the fp32 norm of a 1.6M-element embedding gradient is up to 3e-4 off its float64
    value, differently for whole tensors and for shards; test_clipping_uses_the_global_norm checks
    FSDP's norm against float64 instead.)"""
    la, lb = [r for r in metrics(a) if "loss" in r], [r for r in metrics(b) if "loss" in r]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == steps
    assert_rel_close(torch.tensor([r["loss"] for r in la], dtype=torch.float64),
                     torch.tensor([r["loss"] for r in lb], dtype=torch.float64), 1e-5, "loss")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fsdp_run(tiny_data, tmp_path_factory):
    """A 2-rank FSDP run of STEPS steps, sharded checkpoints at steps 3 and 6 written in the
    background (--async-ckpt; dropout on)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = torchrun(fsdp_flags(tiny_data, out, async_ckpt="true"))
    assert done.stdout.count("training tiny model") == 1  # only rank 0 prints
    return out


def no_dropout_differs(flags):  # dropout draws differ per rank: equality with one process needs it off
    return {**flags, "dropout": "0.0"}


@pytest.mark.parametrize("backend, ranks, dp_shard", [
    ("torch", 2, None),
    ("triton", 2, None),  # the kernels under the interpreter (~30 s)
    ("torch", 2, 1),  # HSDP's 2-D mesh, 2 replicas x 1 shard: gradients all-reduced across the replicas
    pytest.param("torch", 4, 2, marks=pytest.mark.slow),  # HSDP, 2 replicas x 2 shards: 4 processes on 2 cores
])
def test_fsdp_ranks_match_one_process(tiny_data, tmp_path, backend, ranks, dp_shard):
    """`ranks` FSDP ranks (sharded over all, or HSDP over groups of `dp_shard`) log the losses of one
    process with grad_accum `ranks`, and their checkpoint consolidates to its model."""
    flags = no_dropout_differs(fsdp_flags(tiny_data, tmp_path / "fsdp", backend=backend, ckpt_interval=1000))
    if dp_shard is not None:
        flags["dp_shard"] = str(dp_shard)
    if backend == "triton":  # the interpreter is slow: a smaller model, the same number of steps
        flags.update(n_embd="16", n_head="1", block_size="16")
    torchrun(flags, ranks)
    single = {**flags, "out": str(tmp_path / "single"), "grad_accum": str(ranks), "parallel": "auto"}
    single.pop("dp_shard", None)
    assert run(single) == 0
    assert_losses_close(tmp_path / "fsdp", tmp_path / "single", list(range(1, STEPS + 1)))
    assert metrics(tmp_path / "fsdp")[0]["backends"]["attention"] == backend
    # the consolidated sharded checkpoint computes the single process's loss on fresh tokens
    sharded, plain = checkpoint.load(tmp_path / "fsdp"), checkpoint.load(tmp_path / "single")
    assert checkpoint.is_sharded(checkpoint.latest(tmp_path / "fsdp")) and sharded["world_size"] == ranks
    assert sharded["model"].keys() == plain["model"].keys()
    tokens = torch.randint(0, 1000, (2, int(flags["block_size"]) + 1))
    losses = [checkpoint.model_from(ckpt, backend="torch")(tokens[:, :-1], tokens[:, 1:])[1].double()
              for ckpt in (sharded, plain)]
    assert_rel_close(losses[0], losses[1], 1e-5, "loss of the consolidated model")


def test_fsdp_writes_sharded_checkpoints(fsdp_run):
    found = checkpoint.checkpoints(fsdp_run)
    assert [p.name for p in found] == ["ckpt_0000003", "ckpt_0000006"]
    assert all(p.is_dir() and checkpoint.is_sharded(p) for p in found)
    assert sorted(f.name for f in found[-1].iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                          "train_state.pt"]
    assert not list(fsdp_run.glob(".ckpt_*"))  # no staging directory is left
    ckpt = checkpoint.load(fsdp_run)
    assert ckpt["step"] == STEPS and len(ckpt["rng"]) == 2 and checkpoint.nonfinite_tensors(ckpt) == []
    model = checkpoint.model_from(ckpt)  # the consolidated dict is a single-file checkpoint's
    assert isinstance(model, GPT) and model.lm_head.weight is model.transformer.wte.weight
    assert {int(state["step"]) for state in ckpt["optimizer"]["state"].values()} == {STEPS}
    assert checkpoint.read_config(found[-1])["parallel"] == "fsdp"


def resumed_copy(run_dir: Path, tmp_path: Path, step: int) -> Path:
    """A copy of `run_dir` holding its checkpoints up to `step` only."""
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    for path in checkpoint.checkpoints(copy):
        if checkpoint.step_of(path) > step:
            shutil.rmtree(path)
    return copy


def test_fsdp_resume_is_bitwise_at_the_same_world_size(fsdp_run, tmp_path):
    copy = resumed_copy(fsdp_run, tmp_path, 3)
    torchrun({"out": str(copy), "resume": "true", "async_ckpt": "false"})  # the background saves were complete
    assert train_log(copy) == train_log(fsdp_run)  # exact: loss, lr, grad norm (dropout RNG restored)
    a, b = checkpoint.load(fsdp_run), checkpoint.load(copy)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


def test_two_rank_checkpoint_resumes_with_one_rank(fsdp_run, tmp_path, capsys):
    """DCP reshards the 2-rank checkpoint for one process (an FSDP group of one): the same data
    order; dropout draws start afresh, so the losses are close, not equal."""
    copy = resumed_copy(fsdp_run, tmp_path, 3)
    assert run({"out": str(copy), "resume": "true"}) == 0
    assert "saved by 2 processes, this run has 1" in capsys.readouterr().out
    resumed = checkpoint.load(copy)
    assert resumed["step"] == STEPS and resumed["world_size"] == 1
    assert checkpoint.is_sharded(checkpoint.latest(copy))
    assert [r["step"] for r in metrics(copy) if "loss" in r] == list(range(1, STEPS + 1))


def test_sample_eval_export_read_a_sharded_checkpoint(fsdp_run, tmp_path, capsys):
    newest = checkpoint.latest(fsdp_run)
    assert main(["sample", "--ckpt", str(newest), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--backend", "torch", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"ctx": "The king", "label": 0, "endings": [" is dead.", " sings."]}) + "\n")
    assert main(["eval", "--ckpt", str(fsdp_run), "--task", "hellaswag", "--data", str(items),
                 "--backend", "torch", "--device", "cpu"]) == 0
    assert "acc" in capsys.readouterr().out
    single = tmp_path / "consolidated.pt"
    assert main(["export", "--ckpt", str(newest), "--consolidate", str(single)]) == 0
    one_file = checkpoint.load(single)
    assert one_file["step"] == STEPS and one_file["config"]["parallel"] == "fsdp"
    for name, tensor in checkpoint.load(newest)["model"].items():
        assert torch.equal(tensor, one_file["model"][name]), name
    # a plain (non-FSDP) model and optimizer take the consolidated states as their own
    model = checkpoint.model_from(one_file)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    optimizer.load_state_dict(one_file["optimizer"])
    assert len(optimizer.state) == len(list(model.parameters()))


CLIP_AND_BYTES = textwrap.dedent("""
    import copy, json, sys
    import torch
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPT
    from tritongpt.train import distributed, parallel
    d = distributed.setup("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, n_embd=32, n_head=2, block_size=16, backend="torch"))
    whole = copy.deepcopy(model)
    parallel.shard(model, d, None, dp_shard=json.loads(sys.argv[2]))
    x, y = torch.randint(0, 1000, (2, 2 * d.world_size, 16))
    model(x[2 * d.rank:2 * d.rank + 2], y[2 * d.rank:2 * d.rank + 2])[1].backward()
    for k in range(d.world_size):  # the whole model sees every rank's rows: the mean gradient
        (whole(x[2 * k:2 * k + 2], y[2 * k:2 * k + 2])[1] / d.world_size).backward()
    grads = [p.grad.double() for p in whole.parameters()]
    norm64 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm = parallel.clip_grad_norm(model.parameters(), 0.5)
    clipped = [p.grad.full_tensor().double() for p in model.parameters()]
    expected = [g * (0.5 / (norm64 + 1e-6)) for g in grads]
    err = max(((c - e).abs().max() / e.abs().max()).item() for c, e in zip(clipped, expected))
    for opt, m in ((model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu"), model),
                   (whole.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu"), whole)):
        opt.step()
        if m is model:
            sharded = parallel.local_bytes(m, opt)
        else:
            full = parallel.local_bytes(m, opt)
    json.dump(dict(norm=norm.item(), norm64=norm64.item(), clip_err=err, sharded=sharded, full=full),
              open(sys.argv[1] + f"/rank{d.rank}.json", "w"))
    distributed.cleanup()
""")


@pytest.mark.parametrize("ranks, dp_shard", [(2, None), (2, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_clipping_uses_the_global_norm_and_a_rank_holds_its_share_of_the_bytes(tmp_path, ranks, dp_shard):
    """The norm FSDP clips with is the float64 norm of the whole gradient (every rank's shards),
    the same on every rank; parameters + AdamW state take about 1/(ranks sharing them: all, or
    dp_shard under HSDP) of the bytes per rank of one whole copy (DDP's per rank)."""
    script = tmp_path / "clip.py"
    script.write_text(CLIP_AND_BYTES)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(script), str(tmp_path), json.dumps(dp_shard)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    share = 1 / (dp_shard or ranks)
    for rank in found:
        assert rank["norm"] == found[0]["norm"]
        assert abs(rank["norm"] - rank["norm64"]) <= 1e-5 * rank["norm64"]
        assert rank["clip_err"] <= 1e-5
        assert 0.98 * share <= rank["sharded"] / rank["full"] <= 1.02 * share, rank
    print(f"parameter + optimizer bytes per rank: {found[0]['sharded']:,}, a whole copy {found[0]['full']:,}")


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_restarts_a_killed_rank_and_ends_with_the_uninterrupted_weights(fsdp_run, tiny_data, tmp_path):
    """`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts 2 ... train --resume`: one
    rank SIGKILLed once a checkpoint exists, torchrun restarts the group, it resumes from the newest
    checkpoint and ends with the weights of the uninterrupted run (fsdp_run: checkpoints never
    change the trajectory)."""
    out, log = tmp_path / "elastic", tmp_path / "torchrun.log"
    flags = fsdp_flags(tiny_data, out, ckpt_interval=1, resume="true")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
            "-m", "tritongpt.cli", "train", *argv_of(flags)]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # output to a file, not a pipe, and a session of its own: a hung restart's workers can hold
    # neither the test nor the machine once the session is killed
    with log.open("w") as sink:
        agent = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "ckpt_0000002").is_dir():
            assert agent.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        try:
            agent.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the restart hung:\n" + log.read_text()[-6000:])
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left: the run ended
            os.killpg(agent.pid, signal.SIGKILL)
    output = log.read_text()
    assert agent.returncode == 0, output[-6000:]
    assert output.count("training tiny model") == 2, output[-3000:]  # the first start and the restart
    a, b = checkpoint.load(fsdp_run), checkpoint.load(out)
    assert b["step"] == STEPS
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_restarts_on_torchruns_shared_store_are_refused_before_anything_is_written(tiny_data, tmp_path, monkeypatch,
                                                                                  capsys):
    """A worker of `torchrun --max-restarts 2` without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (its
    environment as torchrun sets it): one line naming the variable, exit 2, OUT never created."""
    out = tmp_path / "run"
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="1",
                            TORCHELASTIC_MAX_RESTARTS="2", TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(name, value)
    assert main(["train", *argv_of(fsdp_flags(tiny_data, out, resume="true"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err, err
    assert "--max-restarts 2" in err and not out.exists()


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_torchrun_agents_on_one_machine_train_as_two_nodes(fsdp_run, tiny_data, tmp_path):
    """README's multi-node command with --nnodes 2: two torchrun agents (one process each) meet
    at a c10d rendezvous on localhost and train fsdp_run's run, ending with its weights."""
    out = tmp_path / "two_nodes"
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}",
                  "--rdzv-id=tritongpt-test"]
    argv = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "tritongpt.cli", "train",
            *argv_of(fsdp_flags(tiny_data, out))]
    # one thread per worker, as torchrun gives fsdp_run's 2 processes per node: the same sums, bitwise
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    assert sum(output.count("training tiny model") for output in outputs) == 1  # only global rank 0 prints
    a, b = checkpoint.load(fsdp_run), checkpoint.load(out)
    assert b["step"] == STEPS and b["world_size"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_damaged_newest_sharded_checkpoint_is_passed_over(fsdp_run, tmp_path, capsys):
    """A truncated shard of the newest checkpoint: resume warns, continues from the one before and
    replaces the damaged directory when it gets there; a staging directory a kill left behind is
    never listed."""
    copy = resumed_copy(fsdp_run, tmp_path, STEPS)
    (copy / ".ckpt_0000009.staging").mkdir()  # a save killed before its rename
    shard = copy / "ckpt_0000006" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert [p.name for p in checkpoint.checkpoints(copy)] == ["ckpt_0000003", "ckpt_0000006"]
    assert run({"out": str(copy), "resume": "true"}) == 0
    assert "warning: passing over cannot read checkpoint" in capsys.readouterr().err
    assert checkpoint.load(copy)["step"] == STEPS  # ckpt_0000006 rewritten whole
    assert [r["step"] for r in metrics(copy) if "loss" in r] == list(range(1, STEPS + 1))


def test_one_process_checkpoint_resumes_with_two_ranks(fsdp_run, tiny_data, tmp_path):
    """1 -> 2: a one-process FSDP run (a group of one) resumed by 2 ranks finishes its steps."""
    out = tmp_path / "one"
    assert run(fsdp_flags(tiny_data, out, max_steps=3, decay_steps=STEPS, grad_accum=2)) == 0
    assert checkpoint.load(out)["world_size"] == 1
    done = torchrun({"out": str(out), "resume": "true", "max_steps": str(STEPS), "grad_accum": "1"})
    assert "saved by 1 processes, this run has 2" in done.stdout
    resumed = checkpoint.load(out)
    assert resumed["step"] == STEPS and resumed["world_size"] == 2 and len(resumed["rng"]) == 2
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
