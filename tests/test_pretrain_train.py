"""End to end on CPU: `examples/pretrain.py` on the embedded corpus.

* a fresh run learns (loss from ~ln(512) down by well over a nat), writes checkpoints, metrics,
  TensorBoard events and the loss-curve PNG; its console is concise (one model line, a line per
  step with an ETA, validation losses, a closing summary whose median throughput the per-step
  records reproduce);
* a run killed after a checkpoint and rerun with the same command says it resumes, resumes at the
  next step, reproduces the uninterrupted loss curve and leaves one record per step;
* rerunning a finished run with a smaller max_steps says there is nothing to do and exits 0;
* `data=mock` trains on random tokens at the model's vocabulary (loss stays at ~ln V);
* TP=2 + SP under torchrun, started from the same initial weights, reproduces the one-process
  curve (tolerance below);
* CP=2 (`parallelism=cp2`, MoE aux loss on) reproduces it too, with the same expert-load metrics, and
  its checkpoint resumes at CP=1, a CP=1 checkpoint at CP=2.

Every run is a process per core (OMP_NUM_THREADS=1) and the machine has two, so the module's runs start
together and each runs as soon as its inputs exist and cores are free (`Job`); each test checks its own.
"""

import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")
STEPS, EVERY = 16, 8
# Same weights, data and schedule; TP=2 splits matmuls and reduces partial sums in another order
# (and SP all-gathers), so fp32 rounding differs and can compound over steps. Measured max |diff|
# over 16 steps: 4.8e-7 nats (OMP_NUM_THREADS=1; 1.8e-5 with 2 accumulated micro-batches) on a
# loss falling from 6.25 to ~3; 1e-3 leaves
# room for other BLAS builds and thread counts while still catching any real sharding error
# (a wrong split or missing reduction moves the loss by > 0.01 within a step or two).
TP2_ATOL = 1e-3
# CP=2 vs one process, aux loss on: measured max |diff| 9.5e-7 over 16 steps. The aux loss's old 1/CP
# gradient weight (fixed in training/fixes.py) moved it by 1.3e-4 at step 3 and 5.2e-3 by step 14.
CP2_ATOL = 1e-4
RESUME_ATOL = 1e-5  # same process layout and op order: identical up to rounding noise
_ORDER = itertools.count()


def _args(run_dir, cache_dir, *extra):
    # the corpus in cache_dir is written atomically, Megatron's index files are not: each run dir has its
    # own, so runs at the same time never read one half-written
    index = os.path.join(os.path.dirname(run_dir), "index", os.path.basename(run_dir))
    return [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", f"data.index_mapping_dir={index}",
            f"trainer.max_steps={STEPS}", f"checkpoint.every_n_steps={EVERY}", "trainer.val_check_interval=1000",
            "optim.warmup_steps=4", "data.micro_batch_size=8", *extra]  # one micro-batch per step: the fastest CPU path


def _env():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd, cwd, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(run_dir):
    records = {}
    with open(os.path.join(run_dir, "metrics", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            records[r["step"]] = r  # a step logged again after a rerun keeps its latest record
    return records


class Job:
    """`fn()` in a thread once the jobs `after` have finished, holding `cores` of the two cores meanwhile
    (a 2-process torchrun takes both); jobs ready at once start in the order they were made, so a
    torchrun is not kept waiting behind later one-core jobs. `result()` waits, then returns what `fn`
    returned or raises what it raised (in the test that asks: a failed run fails its own tests only)."""

    free, ready, changed = 2, [], threading.Condition()

    def __init__(self, fn, after=(), cores=1):
        self.fn, self.after, self.cores, self.value, self.error = fn, after, cores, None, None
        self.order = next(_ORDER)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _first_ready(self):
        return min(Job.ready, key=lambda job: job.order) is self and Job.free >= self.cores

    def _run(self):
        try:
            for job in self.after:
                job.result()
            with Job.changed:
                Job.ready.append(self)
                Job.changed.wait_for(self._first_ready)
                Job.ready.remove(self)
                Job.free -= self.cores
                Job.changed.notify_all()  # the next in line may fit in what is left
            try:
                self.value = self.fn()
            finally:
                with Job.changed:
                    Job.free += self.cores
                    Job.changed.notify_all()
        except BaseException as e:
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def jobs(workdir, corpus_cache):
    """Every run of this module by name, made in the order of the tests that check them."""
    data, one = corpus_cache, [sys.executable, PRETRAIN]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cp2 = [*torchrun, "--standalone", PRETRAIN]
    init = f"checkpoint.init_from={workdir / 'ref' / 'init_checkpoint'}"
    j = {"reference": Job(lambda: _reference(workdir, data)), "killed": Job(lambda: _killed_run(workdir, data))}
    j["killed_rerun"] = Job(lambda: _run(j["killed"].result()[0], cwd=workdir), after=[j["killed"]])
    j["nothing_to_do"] = Job(lambda: _nothing_to_do(workdir, data), after=[j["reference"]])
    after_ref = [j["reference"], j["nothing_to_do"]]  # ref/ is read or copied once no run writes there
    j["tp2"] = Job(lambda: _run([*torchrun, PRETRAIN, *_args(workdir / "tp2", data, "parallelism=tp2_sp", init)],
                                cwd=workdir, timeout=900), after=after_ref, cores=2)
    j["cp2"] = Job(lambda: _run([*cp2, *_args(workdir / "cp2", data, "parallelism=cp2", init)], cwd=workdir),
                   after=after_ref, cores=2)
    j["cp1_to_cp2"] = Job(lambda: _resume(workdir, data, "ref", "cp1_to_cp2", cp2, "parallelism=cp2"),
                          after=after_ref, cores=2)
    j["cp2_to_cp1"] = Job(lambda: _resume(workdir, data, "cp2", "cp2_to_cp1", one), after=[j["cp2"]])
    j["long_val"] = Job(lambda: _long_val_interval_run(workdir / "long_val"))
    j["mock"] = Job(lambda: _mock_run(workdir / "mock"))
    j["stacked"] = Job(lambda: _resume(workdir, data, "ref", "stacked", one, "+model.moe_stacked_experts=true"),
                       after=after_ref)
    yield j
    for job in j.values():  # no run outlives the module
        job.thread.join()


def _reference(workdir, data):
    """One uninterrupted single-process run; also saves its initial weights for the TP=2 and CP=2 runs."""
    run_dir = workdir / "ref"
    t0 = time.time()
    proc = _run([sys.executable, PRETRAIN, *_args(run_dir, data, "checkpoint.save_initial=true",
                                                  f"trainer.val_check_interval={EVERY}")], cwd=workdir)
    return run_dir, _losses(run_dir), proc.stdout, time.time() - t0


@pytest.fixture(scope="module")
def reference(jobs):
    return jobs["reference"].result()


def test_fresh_run_learns_and_writes_outputs(reference):
    run_dir, rec, stdout, _ = reference
    assert sorted(rec) == list(range(1, STEPS + 1))
    first, last = rec[1]["loss"], sum(rec[s]["loss"] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert abs(first - math.log(512)) < 0.3  # untrained: ~uniform over the byte vocabulary
    assert last < first - 2.0, (first, last)
    assert all(rec[s]["tokens_per_s"] > 0 and rec[s]["tflops_per_gpu"] > 0 for s in rec)
    assert rec[1]["lr"] < rec[4]["lr"] and rec[STEPS]["lr"] < rec[5]["lr"]  # warmup, then cosine decay
    assert 1.0 <= rec[STEPS]["moe/imbalance_max"] <= 8 and 0 < rec[STEPS]["moe/entropy_mean"] <= 1
    ckpts = os.listdir(run_dir / "checkpoints")
    assert any(c.endswith("-last") for c in ckpts) and len(ckpts) >= 2, ckpts
    assert (run_dir / "init_checkpoint" / "weights").is_dir()
    with open(run_dir / "metrics" / "loss_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tensorboard"))
    assert re.search(r"step 16/16 \| loss [\d.]+ \| lr [\d.e+-]+ \| \d+ tok/s \| [\d.]+ TFLOP/s/GPU.* \| eta 0s", stdout)


def _tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_console_validation_and_closing_summary(reference):
    run_dir, rec, stdout, _ = reference
    assert f"starting fresh: {run_dir}, {STEPS} steps" in stdout.splitlines()
    # one model line of ours; no Lightning model summary, no per-bucket parameter list
    assert len(re.findall(r"^model qwen3_next_tiny_\w+: [\d.]+M parameters \([\d.]+M active per token\), 4 layers "
                          r"\(3 Gated DeltaNet \+ 1 gated attention\), 8 experts top-2$", stdout, flags=re.M)) == 1
    assert "| Name" not in stdout and "Params for bucket" not in stdout and "megatron_init" not in stdout
    # validation: printed, in its step's record, and equal to what NeMo itself logged to TensorBoard
    raw = [json.loads(line) for line in open(run_dir / "metrics" / "metrics.jsonl")]
    assert [r["step"] for r in raw] == list(range(1, STEPS + 1))  # one record per step
    tb = _tensorboard_scalars(run_dir, "val_loss")
    for step in (EVERY, STEPS):
        assert f"validation at step {step}/{STEPS} | val loss {rec[step]['val_loss']:.4f}" in stdout
        assert min(abs(v - rec[step]["val_loss"]) for v in tb.values()) < 1e-5, (tb, rec[step])
    assert abs(rec[STEPS]["val_loss"] - rec[STEPS]["loss"]) < 1.0
    # closing summary: the median over the steps after warm-up, from the per-step records
    summary = json.loads((run_dir / "metrics" / "summary.json").read_text())
    times = [rec[s]["step_time_s"] for s in range(6, STEPS + 1)]  # default logging.timing_warmup_steps = 5
    assert summary["measured_steps"] == len(times) and summary["median_step_time_s"] == pytest.approx(statistics.median(times))
    assert summary["median_tokens_per_s"] == pytest.approx(8 * 128 / statistics.median(times))
    assert summary["first_step_time_s"] == pytest.approx(rec[1]["step_time_s"])
    # the wall clock over the same steps holds their step times plus the validation between them
    assert summary["wall_step_time_s"] * len(times) >= sum(times)
    assert summary["wall_tokens_per_s"] == pytest.approx(8 * 128 / summary["wall_step_time_s"])
    assert f"wall clock: {summary['wall_step_time_s'] * 1e3:.1f} ms per step" in stdout
    assert _tensorboard_scalars(run_dir, "timing/median_tokens_per_s")[STEPS] == pytest.approx(
        summary["median_tokens_per_s"], rel=1e-6)
    assert f"done: steps 1-{STEPS} of {STEPS} | train loss {rec[STEPS]['loss']:.4f} (step {STEPS}) | val loss " \
           f"{rec[STEPS]['val_loss']:.4f} (step {STEPS})" in stdout
    assert f"= {summary['median_tokens_per_s']:.0f} tokens/s" in stdout
    for where in ("checkpoints", "tensorboard", os.path.join("metrics", "metrics.jsonl"),
                  os.path.join("metrics", "loss_curve.png")):
        assert str(run_dir / where) in stdout
    assert len(stdout.splitlines()) < 2 * STEPS + 30, stdout


def _nothing_to_do(workdir, data):
    run_dir = workdir / "ref"
    before = (run_dir / "metrics" / "metrics.jsonl").read_bytes()
    t0 = time.time()
    proc = _run([sys.executable, PRETRAIN, *_args(run_dir, data, "trainer.max_steps=8")], cwd=workdir)
    return proc, before, time.time() - t0


def test_rerun_of_a_finished_run_has_nothing_to_do(reference, jobs):
    run_dir, _, _, _ = reference
    proc, before, seconds = jobs["nothing_to_do"].result()
    assert (f"{run_dir}: latest checkpoint is step {STEPS} >= max_steps 8; nothing to do — pass a new name= or "
            "raise max_steps") in proc.stdout
    assert "step 1/" not in proc.stdout and (run_dir / "metrics" / "metrics.jsonl").read_bytes() == before
    print("nothing-to-do rerun took", seconds, "s")


def _killed_run(workdir, data):
    """Start, wait until the step after the first checkpoint is logged, then kill the whole run. Returns
    the command and the last step it logged."""
    run_dir = workdir / "resumed"
    cmd = [sys.executable, PRETRAIN, *_args(run_dir, data)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = run_dir / "metrics" / "metrics.jsonl"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and max(_losses(run_dir), default=0) >= EVERY + 2:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return cmd, max(_losses(run_dir))


def test_killed_run_resumes_and_reproduces_the_curve(reference, jobs, workdir):
    _, ref, _, _ = reference
    run_dir = workdir / "resumed"
    metrics = run_dir / "metrics" / "metrics.jsonl"
    _, killed_at = jobs["killed"].result()
    assert EVERY + 2 <= killed_at < STEPS, killed_at

    again = jobs["killed_rerun"].result()
    assert re.search(rf"^resuming {run_dir} from step {EVERY} \(step=\d+-consumed_samples=[\d.]+-last\) to max_steps "
                     rf"{STEPS}$", again.stdout, flags=re.M), again.stdout[:2000]
    logged = [int(m) for m in re.findall(r"^step (\d+)/", again.stdout, flags=re.M)]
    assert logged[0] == EVERY + 1, logged  # resumed at the step after the checkpoint
    assert logged[-1] == STEPS
    rec = _losses(run_dir)
    for step in range(1, STEPS + 1):
        assert rec[step]["loss"] == pytest.approx(ref[step]["loss"], abs=RESUME_ATOL), step
        assert rec[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step
    raw = [json.loads(line)["step"] for line in open(metrics)]
    assert raw == list(range(1, STEPS + 1)), raw  # the killed run's steps past the checkpoint were dropped


def test_tp2_sp_reproduces_single_process_curve(reference, jobs, workdir):
    _, ref, _, _ = reference
    run_dir = workdir / "tp2"
    jobs["tp2"].result()
    rec = _losses(run_dir)
    assert sorted(rec) == list(range(1, STEPS + 1))
    diffs = [abs(rec[s]["loss"] - ref[s]["loss"]) for s in rec]
    print("TP=2 vs TP=1 max |loss diff|:", max(diffs))
    assert max(diffs) < TP2_ATOL, diffs
    assert rec[1]["loss"] == pytest.approx(ref[1]["loss"], abs=1e-4)  # same initial weights


def _stopped_at_first_checkpoint(run_dir, copy_dir, every=EVERY):
    """`run_dir` as a run stopped after its first checkpoint leaves it: the step-`every` checkpoint is the
    ``-last`` one (the directory NeMo resumes from), the later ones are gone."""
    shutil.copytree(run_dir, copy_dir)
    ckpts = copy_dir / "checkpoints"
    (first,) = [d for d in ckpts.iterdir() if d.name.startswith(f"step={every - 1}-") and not d.name.endswith("last")]
    for d in ckpts.iterdir():
        if d != first:
            shutil.rmtree(d)
    first.rename(ckpts / (first.name + "-last"))
    return copy_dir


def _resume(workdir, data, source, name, launch, *extra):
    """`source`'s run copied to `name`, stopped at its first checkpoint, rerun: (run dir, stdout)."""
    stopped = _stopped_at_first_checkpoint(workdir / source, workdir / name)
    return stopped, _run([*launch, *_args(stopped, data, *extra)], cwd=workdir).stdout


def test_cp2_reproduces_single_process_curve_and_resumes_across_layouts(reference, jobs, workdir):
    """CP=2 from the same initial weights gives the one-process losses and expert-load metrics (MoE
    global aux loss on); a CP=2 checkpoint resumed at CP=1 and a CP=1 checkpoint resumed at CP=2 give
    the one-process steps 9-16 (torch_dist checkpoints hold global tensors)."""
    _, ref, _, _ = reference
    run_dir = workdir / "cp2"
    jobs["cp2"].result()
    rec = _losses(run_dir)
    assert sorted(rec) == list(range(1, STEPS + 1))
    diffs = [abs(rec[s]["loss"] - ref[s]["loss"]) for s in rec]
    print("CP=2 vs CP=1 max |loss diff|:", max(diffs))
    assert max(diffs) < CP2_ATOL, diffs
    for s in rec:  # counts summed over the CP ranks = the one process's counts
        moe = [k for k in ref[s] if k.startswith("moe/")]
        assert moe and all(rec[s][k] == pytest.approx(ref[s][k], rel=1e-6) for k in moe), s
    for name in ("cp1_to_cp2", "cp2_to_cp1"):
        stopped, out = jobs[name].result()
        assert re.search(rf"^resuming {stopped} from step {EVERY} ", out, flags=re.M), out[:2000]
        got = _losses(stopped)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert max(abs(got[s]["loss"] - ref[s]["loss"]) for s in range(EVERY + 1, STEPS + 1)) < CP2_ATOL, stopped


def _long_val_interval_run(tmp_path):
    tmp_path.mkdir()
    run_dir = tmp_path / "run"
    # 200 kB of text at seq 128 and 4 sequences a batch: ~380 batches in one pass, interval 1000
    cmd = [sys.executable, PRETRAIN, f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'data'}",
           "trainer.max_steps=2", "trainer.val_check_interval=1000", "data.embedded_max_bytes=200000",
           "checkpoint.every_n_steps=1000", "logging.progress=bar", "logging.verbose=true"]
    return run_dir, _run(cmd, cwd=tmp_path)


def test_val_interval_longer_than_one_pass_over_the_data(jobs):
    """val_check_interval counts steps over the whole run: an interval longer than one pass over a
    small training split must not be refused at startup (it was, on the GPU machine, for the ~1B
    config on the embedded corpus at seq 2048)."""
    run_dir, proc = jobs["long_val"].result()
    rec = _losses(str(run_dir))
    assert sorted(rec) == [1, 2]
    # the progress bar (forced on without a terminal): steps of max_steps, elapsed<remaining, the fields
    bar = proc.stdout.replace("\r", "\n")
    assert re.search(rf"train:?\s+2/2 \|.*\| \[\d\d:\d\d<\d\d:\d\d, loss={rec[2]['loss']:.4f}, "
                     r"lr=[\d.e+-]+, tok/s=\d+, TFLOP/s/GPU=[\d.e+-]+\]", bar), bar[-3000:]
    assert not re.search(r"^step \d+/2 \|", bar, flags=re.M)  # the bar replaces the per-step lines
    # logging.verbose=true: the libraries' info logs (e.g. Megatron's per-bucket parameter list) come back
    assert "Params for bucket" in proc.stdout


def _mock_run(tmp_path):
    tmp_path.mkdir()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, PRETRAIN, f"run_dir={run_dir}", "data=mock", "data.seq_length=64", "data.micro_batch_size=4",
           "data.global_batch_size=4", "trainer.max_steps=6", "trainer.val_check_interval=1000",
           "checkpoint.every_n_steps=1000", "logging.timing_warmup_steps=2", "optim.warmup_steps=2"]
    return run_dir, _run(cmd, cwd=tmp_path)


def test_mock_data_trains_on_random_tokens(jobs, workdir):
    """data=mock: uniform random ids at the model's vocabulary, no files: an untrained model's loss
    is ~ln V, and random tokens cannot be learned, so it stays there."""
    tmp_path = workdir / "mock"
    run_dir, proc = jobs["mock"].result()
    rec = _losses(str(run_dir))
    assert sorted(rec) == list(range(1, 7))
    assert all(abs(r["loss"] - math.log(512)) < 0.15 for r in rec.values()), [r["loss"] for r in rec.values()]
    assert not list(tmp_path.glob("**/*.bin")) and not (tmp_path / "runs").exists()  # nothing written for data
    summary = json.loads((run_dir / "metrics" / "summary.json").read_text())
    assert summary["measured_steps"] == 4 and summary["tokens_per_step"] == 4 * 64
    assert summary["median_step_time_s"] == pytest.approx(statistics.median(rec[s]["step_time_s"] for s in range(3, 7)))
    assert "over 4 steps after 2 warm-up" in proc.stdout


def test_stacked_experts_resume_a_per_expert_checkpoint(reference, jobs):
    """``moe_stacked_experts`` (two Parameters per MoE layer) resumed from the one-process run's step-8
    checkpoint (per-expert parameters, Adam state included) gives its steps 9-16 and saves its own."""
    _, ref, _, _ = reference
    stopped, out = jobs["stacked"].result()
    assert re.search(rf"^resuming {stopped} from step {EVERY} ", out, flags=re.M), out[:2000]
    got = _losses(stopped)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s]["loss"] - ref[s]["loss"]) for s in range(EVERY + 1, STEPS + 1)) < RESUME_ATOL
    assert any(d.name.startswith(f"step={STEPS - 1}-") for d in (stopped / "checkpoints").iterdir())
