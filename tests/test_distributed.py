"""Multi-process training on gloo (CPU): 2 ranks x batch B/2 == 1 rank x batch B.

The test spawns the ranks itself (RANK/WORLD_SIZE/MASTER_* as torchrun sets them) and runs the
1-rank reference in its own process. Everything is fp32 with dropout off, so the only
differences are the order of floating-point sums (all-reduce vs one batch). Measured: per-step
losses agree to 1.2e-7 relative, grad norms to 1e-7, and after 3 AdamW steps the weights to
max |diff| 1.6e-6 - 5.2e-6 (Adam's first steps divide by sqrt(v), which magnifies sum-order
noise on near-zero gradient elements); the tolerances are ~10x that. Each known-wrong reduction
moves the weights 50-1000x further: per-rank token normalisation (DDP LoRA) by 4.9e-2,
per-rank clipping (FSDP2 full) by 2.5e-3.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_helpers import make_tiny_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

STEPS = dist_worker.STEPS
W_TOL = dict(rtol=1e-5, atol=5e-5)  # final weights, fp32 (3 steps of AdamW)
LOSS_REL = 1e-6  # per-step loss, fp32 (sums in another order)
BF16_LOSS_REL = 1e-3  # per-step loss, FSDP2 bf16 vs 1-process bf16 (measured 1.2e-4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(r: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    return env


def spawn(args: list[str], world: int = 2, cwd: Path | None = None) -> list[subprocess.Popen]:
    """``python args...`` as ``world`` ranks of one job (what torchrun does, minus its agent)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *args], env=rank_env(r, world, port), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


def wait_all(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Every rank's output; a failed rank fails the test at once (the others are killed, as
    torchrun's agent would, instead of waiting for their collective timeout)."""
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


SCEN = ["ddp_lora", "ddp_lora_accum", "fsdp_full", "fsdp_full_accum", "fsdp_lora", "fsdp_lora_accum"]
BUGS = ["ddp_lora:local_tokens", "fsdp_full:local_clip"]
BF16 = ["fsdp_full_bf16", "fsdp_lora_bf16"]


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "results.pt"
    wait_all(spawn([str(HERE / "dist_worker.py"), str(out), str(tiny), *SCEN, *BUGS, *BF16]))
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_rank(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    return {s: dist_worker.run_scenario(str(tiny), s, 1, d / s) for s in SCEN + BF16}


def _accum(scenario: str) -> int:
    return 2 if scenario.endswith("_accum") else 1


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("scenario", SCEN)
def test_two_ranks_equal_one_rank_of_the_global_batch(two_ranks, one_rank, scenario):
    two, one = two_ranks[scenario], one_rank[scenario]
    assert two["strategy"] == scenario.split("_")[0] and one["strategy"] == "none"
    assert two["target_tokens"] == one["target_tokens"]  # the same global batches
    # sharded evaluation: the pad row of the odd-sized validation set counts nowhere
    assert two["eval"]["eval_tokens"] == one["eval"]["eval_tokens"]
    assert two["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], rel=LOSS_REL)
    assert all(g > 0.3 for g in one["grad_norm"])  # clipping (max_grad_norm 0.3) is active
    # LoRA's decoder layers run as one fused node, FSDP2-sharded ones too (its hooks are exempt)
    assert two["fused_layer_calls"] == one["fused_layer_calls"] == (2 * STEPS * _accum(scenario)
                                                                     if "lora" in scenario else 0)
    for a, b in zip(two["loss"], one["loss"]):
        assert a == pytest.approx(b, rel=LOSS_REL)
    for a, b in zip(two["grad_norm"], one["grad_norm"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert len(two["weights"]) == len(one["weights"]) > 0
    # Recipe.export: rank 0 writes the weights gathered from the shards (FSDP2), as one process does
    assert two["export"].keys() == one["export"].keys() and len(one["export"]) > 0
    for n in one["export"]:
        torch.testing.assert_close(two["export"][n], one["export"][n], **W_TOL, msg=lambda m: f"export {n}: {m}")
    for n in one["weights"]:
        torch.testing.assert_close(two["weights"][n], one["weights"][n], **W_TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("bug", BUGS)
def test_per_rank_reductions_would_be_caught(two_ranks, one_rank, bug):
    """The same comparison with per-rank token normalisation (DDP LoRA) or per-rank clipping
    (FSDP2 full) swapped in fails by orders of magnitude: the test above can tell them apart."""
    scenario = bug.split(":")[0]
    wrong, one = two_ranks[bug], one_rank[scenario]
    diff = max_weight_diff(wrong["weights"], one["weights"])
    assert diff > 10 * W_TOL["atol"], f"{bug}: max |diff| {diff:.3g} is within the tolerance"


@pytest.mark.parametrize("scenario, dtypes", [("fsdp_full_bf16", {torch.bfloat16, torch.float32}),
                                              ("fsdp_lora_bf16", {torch.bfloat16})])
def test_fsdp_with_bf16_weights(two_ranks, one_rank, scenario, dtypes):
    """A bf16 run mixes bf16 matmul weights with fp32 norms/embeddings, which one FSDP2 group
    cannot hold: the shards are kept in fp32 and gathered as bf16 (MixedPrecisionPolicy). Its
    loss curve follows the single-process bf16 run's to bf16 round-off, and its export has the
    same dtypes. With LoRA the frozen base stays bf16 (only trainable weights must share a
    dtype in an FSDP2 group) and the adapters are fp32 shards gathered as bf16. (Weights are not compared element by element: the norms and embeddings compute
    in bf16 here and in fp32 in one process, and AdamW's first steps move a near-zero-gradient
    element by a whole lr either way, so single elements differ by up to 3 x lr.)"""
    two, one = two_ranks[scenario], one_rank[scenario]
    assert two["target_tokens"] == one["target_tokens"]
    for a, b in zip(two["loss"], one["loss"]):
        assert a == pytest.approx(b, rel=BF16_LOSS_REL)
    assert {n: w.dtype for n, w in two["weights"].items()} == {n: w.dtype for n, w in one["weights"].items()}
    assert {w.dtype for w in one["weights"].values()} == dtypes
    if "lora" in scenario:  # the sharded base is not upcast: half the memory of fp32 shards
        assert two["frozen_dtypes"] == one["frozen_dtypes"] == {torch.bfloat16}


# ---------------------------------------------------------------- the fastft command on 2 ranks
def cli_args(tiny, run_dir, *extra) -> list[str]:
    return ["--model.path", str(tiny), "--output.dir", str(run_dir), *dist_worker.COMMON, *extra]


def fastft_ranks(tiny, run_dir, *extra, world: int = 2) -> list[subprocess.Popen]:
    return spawn(["-m", "fastft", "train", *cli_args(tiny, run_dir, *extra)], world=world, cwd=run_dir.parent)


def train_lines(run_dir) -> list[dict]:
    import json

    return [r for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl")) if r["event"] == "train"]


def final_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model" / "model.safetensors"))


FULL = [*dist_worker.SCENARIOS["fsdp_full"][:-2], "--train.save_every", "2"]  # auto = fsdp for full


def test_resume_across_world_sizes(tiny, tmp_path):
    """A 2-rank FSDP2 checkpoint resumes on 1 rank and a 1-rank checkpoint on 2 ranks (DCP
    reshards the weights and the optimizer state; the data position is recomputed), and both
    end where an uninterrupted 1-rank run of the same global batch (8) ends."""
    from fastft.train.cli import run

    run(None, cli_args(tiny, tmp_path / "ref", *FULL, "--train.batch_size", "8", "--train.max_steps", "4"))
    ref = train_lines(tmp_path / "ref")
    # 2 ranks x 4 for 2 steps, then 1 rank x 8 for 2 more
    (tmp_path / "a").mkdir()
    wait_all(fastft_ranks(tiny, tmp_path / "a", *FULL, "--train.batch_size", "4", "--train.max_steps", "2"))
    assert (tmp_path / "a" / "checkpoints" / "step-000002" / "dcp").is_dir()
    run(None, cli_args(tiny, tmp_path / "a", *FULL, "--train.batch_size", "8", "--train.max_steps", "4"), resume=True)
    # 1 rank x 8 for 2 steps, then 2 ranks x 4 for 2 more
    run(None, cli_args(tiny, tmp_path / "b", *FULL, "--train.batch_size", "8", "--train.max_steps", "2"))
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    wait_all(fastft_ranks(tiny, tmp_path / "b", *FULL, "--train.batch_size", "4", "--train.max_steps", "4",
                          "--resume"))
    w_ref = final_weights(tmp_path / "ref")
    for d in ("a", "b"):
        lines = train_lines(tmp_path / d)
        assert [r["step"] for r in lines] == [1, 2, 3, 4]
        assert [r["target_tokens"] for r in lines] == [r["target_tokens"] for r in ref]
        for x, y in zip(lines, ref):
            assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_REL)
        w = final_weights(tmp_path / d)
        assert w.keys() == w_ref.keys()
        for n in w_ref:
            torch.testing.assert_close(w[n], w_ref[n], **W_TOL, msg=lambda m: f"{d} {n}: {m}")


def adapter_files(run_dir, sub="final") -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    d = Path(run_dir) / sub / "adapter"
    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "adapter_config.json").read_text())


def test_fsdp_lora_exports_the_single_process_adapter_and_resumes_across_world_sizes(tiny, tmp_path):
    """FSDP2 of the frozen base with LoRA (2 ranks x 4): every checkpoint and final/ hold the
    PEFT adapter gathered from the shards, equal to the 1-process run's (batch 8) to fp32
    round-off, with the same adapter_config.json; the step-2 DCP checkpoint resumes on 1 process,
    a 1-process step-2 checkpoint on 2 FSDP2 ranks, and both end there too."""
    import shutil

    from fastft.train.cli import run

    lora = [*dist_worker.SCENARIOS["fsdp_lora"], "--train.max_steps", "4", "--train.save_every", "2"]
    run(None, cli_args(tiny, tmp_path / "ref", *lora, "--train.batch_size", "8", "--train.distributed", "auto"))
    (tmp_path / "a").mkdir()
    wait_all(fastft_ranks(tiny, tmp_path / "a", *lora, "--train.batch_size", "4"))
    assert (tmp_path / "a" / "checkpoints" / "step-000002" / "dcp").is_dir()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "b" / "final")
    run(None, cli_args(tiny, tmp_path / "b", *lora, "--train.batch_size", "8", "--train.distributed", "auto"),
        resume=True)
    shutil.copytree(tmp_path / "ref", tmp_path / "c")  # 1 process to step 2, then 2 FSDP2 ranks
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "c" / "final")
    wait_all(fastft_ranks(tiny, tmp_path / "c", *lora, "--train.batch_size", "4", "--resume"))
    w_ref, c_ref = adapter_files(tmp_path / "ref")
    assert c_ref["peft_type"] == "LORA" and len(w_ref) > 0
    for run_dir, sub in ((tmp_path / "a", "final"), (tmp_path / "a", "checkpoints/step-000004"),
                         (tmp_path / "b", "final"), (tmp_path / "c", "final")):
        w, c = adapter_files(run_dir, sub)
        assert c == c_ref and w.keys() == w_ref.keys()
        for n in w_ref:
            assert w[n].dtype == w_ref[n].dtype
            torch.testing.assert_close(w[n], w_ref[n], **W_TOL, msg=lambda m: f"{run_dir.name}/{sub} {n}: {m}")
    ref = train_lines(tmp_path / "ref")
    for d in ("b", "c"):
        lines = train_lines(tmp_path / d)
        assert [r["step"] for r in lines] == [1, 2, 3, 4]
        for x, y in zip(lines, ref):
            assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_REL), d


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the test reads the DCP files alone
@pytest.mark.parametrize("scenario, lr", [("fsdp_lora", "0.3"), ("fsdp_full", "0.05")])
def test_fsdp_load_best_at_end(tiny, tmp_path, scenario, lr):
    """Early stopping with train.load_best_at_end on 2 FSDP2 ranks: final/ holds the best DCP
    checkpoint's weights, read back into the shards (not the last step's). The lr is high enough
    that the held-out loss gets worse after its best step (so the check can fail)."""
    import json

    import torch.distributed.checkpoint as tdcp
    from safetensors.torch import load_file

    (tmp_path / "r").mkdir()
    wait_all(fastft_ranks(tiny, tmp_path / "r", *dist_worker.SCENARIOS[scenario], "--train.max_steps", "8",
                          "--train.batch_size", "4", "--train.lr", lr, "--train.max_grad_norm", "0",
                          "--train.eval_every", "1", "--train.early_stopping_patience", "3"))
    evals = [r for r in map(json.loads, open(tmp_path / "r" / "metrics.jsonl")) if r["event"] == "eval"]
    best = min(evals[1:], key=lambda r: r["eval_loss"])["step"]
    last = evals[-1]["step"]
    assert best < last  # the run went on past its best evaluation
    ckpt = tmp_path / "r" / "checkpoints" / f"step-{best:06d}"
    if scenario == "fsdp_lora":
        final = load_file(str(tmp_path / "r" / "final" / "adapter" / "adapter_model.safetensors"))
        saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    else:
        final = final_weights(tmp_path / "r")
        box = {"model": {k: torch.empty_like(v) for k, v in final.items()}}
        tdcp.load(box, checkpoint_id=str(ckpt / "dcp"))
        saved = box["model"]
    assert final.keys() == saved.keys()
    for n in final:
        assert torch.equal(final[n], saved[n]), n


def test_dropout_resume_equals_uninterrupted_on_every_rank(tiny, tmp_path):
    """Dropout on, 2 ranks (DDP LoRA): resuming from the step-2 checkpoint repeats steps 3-4 of
    the uninterrupted run exactly, which needs every rank's RNG state (with only rank 0's, rank
    1 draws other dropout masks). A half-written checkpoint (what ``kill -9`` during a save
    leaves: a ``.step-*`` temporary folder) is ignored."""
    import shutil

    lora = [*dist_worker.SCENARIOS["ddp_lora"], "--lora.dropout", "0.1", "--train.batch_size", "4",
            "--train.max_steps", "4", "--train.save_every", "2"]
    (tmp_path / "u").mkdir()
    wait_all(fastft_ranks(tiny, tmp_path / "u", *lora))
    ckpts = tmp_path / "u" / "checkpoints"
    assert (ckpts / "step-000002" / "rng" / "rank-00001.pt").is_file()
    assert (ckpts / "step-000004" / "adapter" / "adapter_model.safetensors").is_file()
    shutil.copytree(tmp_path / "u", tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-000004")
    shutil.copytree(ckpts / "step-000004", tmp_path / "r" / "checkpoints" / ".step-000004.partial")
    (tmp_path / "r" / "checkpoints" / ".step-000004.partial" / "trainer_state.pt").unlink()
    wait_all(fastft_ranks(tiny, tmp_path / "r", *lora, "--resume"))
    a, b = train_lines(tmp_path / "u"), train_lines(tmp_path / "r")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-12) and x["grad_norm"] == y["grad_norm"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "u" / "final" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "r" / "final" / "adapter" / "adapter_model.safetensors"))
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_kill_9_during_a_dcp_save_resumes_from_the_previous_checkpoint(tiny, tmp_path):
    """``kill -9`` of the whole job while the step-4 DCP save is in progress (rank 1 has written
    its shard file and stalls inside DCP's writer, tests/dist_kill_worker.py; rank 0 waits for
    it): step-000002 stays the newest loadable checkpoint, ``--resume`` removes the half-written
    folder and continues from step 2, and the run ends where an uninterrupted one ends, bit for
    bit. A save that wrote into ``step-000004`` directly (not atomic) leaves a step-000004 without
    DCP's ``.metadata``, which ``--resume`` would pick and fail to load."""
    from fastft.train.checkpoint import list_checkpoints

    full = [*FULL, "--train.batch_size", "4", "--train.max_steps", "6"]  # FSDP2 full, saves every 2
    (tmp_path / "u").mkdir()
    wait_all(fastft_ranks(tiny, tmp_path / "u", *full))
    (tmp_path / "k").mkdir()
    marker = tmp_path / "saving.txt"
    procs = spawn([str(HERE / "dist_kill_worker.py"), str(marker), "4", *cli_args(tiny, tmp_path / "k", *full)],
                  cwd=tmp_path)
    t0 = time.monotonic()
    try:
        while not marker.is_file() and all(p.poll() is None for p in procs) and time.monotonic() - t0 < 400:
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()  # SIGKILL: no handler, no cleanup
        outs = [p.communicate()[0] for p in procs]
    assert marker.is_file(), "no rank reached the step-4 save:\n" + "\n".join(o[-2000:] for o in outs)
    assert [p.returncode for p in procs] == [-9, -9]
    ckpts = tmp_path / "k" / "checkpoints"
    assert [c.name for c in list_checkpoints(ckpts)] == ["step-000002"]
    partial = [c for c in ckpts.iterdir() if c.name.startswith(".step-000004.")]
    assert len(partial) == 1, sorted(c.name for c in ckpts.iterdir())
    written = marker.read_text().split()
    assert any(f.endswith(".distcp") for f in written), written  # the save was under way ...
    assert not (partial[0] / "dcp" / ".metadata").exists()  # ... and not finished
    wait_all(fastft_ranks(tiny, tmp_path / "k", *full, "--resume"))
    assert not [c.name for c in ckpts.iterdir() if c.name.startswith(".")]  # remove_debris took it
    assert [c.name for c in list_checkpoints(ckpts)][-1] == "step-000006"
    a, b = train_lines(tmp_path / "u"), train_lines(tmp_path / "k")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)
    wa, wb = final_weights(tmp_path / "u"), final_weights(tmp_path / "k")
    assert wa.keys() == wb.keys()
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_dead_rank_ends_the_job_within_the_timeout(tiny, tmp_path):
    """SIGKILL one rank mid-run: the survivor exits non-zero with a one-line error well within
    train.distributed_timeout, instead of hanging."""
    (tmp_path / "k").mkdir()
    procs = fastft_ranks(tiny, tmp_path / "k", *dist_worker.SCENARIOS["ddp_lora"], "--train.batch_size", "4",
                         "--train.max_steps", "100000", "--train.distributed_timeout", "60")
    metrics = tmp_path / "k" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.is_file() and "train" in metrics.read_text()):
        assert time.monotonic() - t0 < 300 and procs[0].poll() is None, procs[0].communicate()[0][-2000:]
        time.sleep(0.5)
    procs[1].kill()
    t_kill = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.monotonic() - t_kill
    procs[1].communicate()
    assert procs[0].returncode not in (0, None)
    assert waited < 60, f"the surviving rank took {waited:.0f} s"
    assert "lost contact with the other ranks" in out, out[-2000:]


@pytest.mark.parametrize("extra, msg", [
    (["--lora.int8_base", "true", "--train.distributed", "fsdp"], "FSDP2 does not shard int8 base weights"),
    (["--output.save_merged", "true", "--train.distributed", "fsdp"], "merge the final adapter afterwards"),
    (["--finetune.mode", "head", "--finetune.unfreeze_after_steps", "3"], "not supported with train.distributed=ddp"),
    (["--train.distributed", "none"], "torchrun started 2 processes"),
])
def test_unsupported_mixes_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, msg):
    """Under torchrun (WORLD_SIZE=2) a mix that cannot run distributed is one line and exit 2,
    before the model loads (the model path does not even exist) and before the run dir exists."""
    from fastft.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["train", "--model.path", str(tmp_path / "no-model"), "--output.dir", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_python_m_fastft_ignores_the_callers_modules(tiny, tmp_path):
    """``python -m fastft`` (what ``torchrun -m fastft`` runs on every rank) puts the caller's
    folder on sys.path; fastft/__main__.py drops it, so a user's kernels.py / data.py / ... is
    never imported (a file named fastft.py would shadow the package itself: README says to use
    ``torchrun --no-python fastft`` then)."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "imported.txt"
    for name in ("kernels", "data", "optim", "trainer", "transformers", "yaml", "click", "distributed"):
        (work / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise ImportError('user file {name}.py imported')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "fastft", "train", *cli_args(tiny, tmp_path / "run"),
                          "--train.max_steps", "1", "--train.batch_size", "2"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert not marker.exists(), f"fastft imported the caller's files: {marker.read_text()}"
    assert (tmp_path / "run" / "final").is_dir()
