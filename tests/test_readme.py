"""README's commands, run in order on a fresh copy of the repository, each do what README says.

The commands are read from README.md's fenced ``bash`` blocks (so this test follows README when it
changes) and run in a copy of the tracked files (`git ls-files`), with the copy's package first on
PYTHONPATH. A command no rule below covers fails the test: add its rule (or its skip) here.

* skipped, each with its reason: `SKIPPED`;
* templates: ``[...]`` options are kept, ``a|b`` takes the alternative that runs here (`PREFERRED`,
  else the last), ``HF_DIR`` is a tiny random HF checkpoint made by the test, ``NEMO_DIR`` the
  conversion's output, and an ``--output`` placeholder naming an existing directory a new one beside it;
* the one override for time: training commands get `FAST` (README's default run is 200 steps);
* the test's own additions: README says a rerun says what it does, so the default pretraining command
  is run a second time, unchanged ("nothing to do", before the heavy imports: < 3 s).

Commands start in README order, at most two at a time (two CPU cores), and a command waits for each
earlier one that touches the same paths (a generation waits for the run it reads); while it waits, the
next commands that wait for nothing start first. ~80 s on 2 cores.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

SKIPPED = {  # predicate on the command's words -> why it is not run here
    "pip install": (lambda w: w[:2] == ["pip", "install"], "installs packages (network); the suite runs in the "
                    "installed environment"),
    "pytest": (lambda w: "pytest" in w, "the test suite itself, which contains this test"),
    "GPU": (lambda w: any(x.startswith("PYTHONPATH=/tmp/site") for x in w) or any(
        os.path.basename(x) in ("bench_decode.py", "bench_model.py", "benchmark.py") for x in w),
        "GPU-only (CUDA, the kernel packages in /tmp/site); see docs/gpu.md"),
}
PREFERRED = ("cpu", "fp32", "byte")  # for `a|b`: what runs on a CPU-only machine without downloads
FAST = ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1"]
STEPS = 4


def readme_commands(text):
    """[(section, command)] for every command of every ```bash block, continuation lines joined."""
    out, section, block = [], "", None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            if block is not None:
                joined = "\n".join(block).replace("\\\n", " ")
                out += [(section, c.strip()) for c in joined.splitlines() if c.strip()]
                block = None
            elif line.strip() == "```bash":
                block = []
            continue
        if block is not None:
            block.append(line)
    return out


def _words(command):
    return shlex.split(command, comments=True)


def _choose(word):
    if "|" not in word or word.startswith("-"):
        return word
    alternatives = word.split("|")
    return next((a for a in alternatives if a in PREFERRED), alternatives[-1])


def _option(words, name):
    return words[words.index(name) + 1] if name in words else None


class Step:
    def __init__(self, section, command, words, kind, paths, check, extra=False):
        self.section, self.command, self.words, self.kind = section, command, words, kind
        self.paths, self.check, self.extra = paths, check, extra
        self.proc = self.t0 = self.seconds = self.out = self.err = None


def _run_dir(words):
    name = next((w.split("=", 1)[1] for w in words if w.startswith("name=")), None)
    config = _option(words, "--config-name") or "qwen3_next_tiny"
    return os.path.join("runs", name or config)


def plan(text, work, hf_dir):
    """The steps (resolved commands and what each must show), in README order."""
    placeholders = {"HF_DIR": hf_dir, "NEMO_DIR": os.path.join(work, "nemo_ckpt")}
    steps = []
    for section, command in readme_commands(text):
        words = _words(command)
        if any(pred(words) for pred, _ in SKIPPED.values()):
            continue
        words = [_choose(w.replace("[", "").replace("]", "")) for w in words]
        words = [w for w in words if w]
        for i, w in enumerate(words):
            if w in placeholders:
                path = placeholders[w]
                if i and words[i - 1] == "--output" and (os.path.exists(path) or any(path in e.words for e in steps)):
                    path += "_export"  # README names the other direction's output like its input
                words[i] = path
        script = next((os.path.basename(w) for w in words if w.endswith(".py")), None)
        if script == "pretrain.py" and "--dry-run" in words:
            steps.append(Step(section, command, words, "dry_run", set(), check_dry_run))
        elif script == "pretrain.py":
            words = words + FAST
            run_dir = _run_dir(words)
            paths = {run_dir, "runs/data"}  # and the data cache every run of the tiny config shares
            steps.append(Step(section, command, words, "pretrain", paths, check_pretrain))
            if not any(s.kind == "rerun" for s in steps):
                steps.append(Step(section, command, list(words), "rerun", paths, check_rerun, extra=True))
        elif script in ("convert_hf_to_nemo.py", "convert_nemo_to_hf.py"):
            steps.append(Step(section, command, words, script, {_option(words, "--input"), _option(words, "--output")},
                              check_h2n if script == "convert_hf_to_nemo.py" else check_n2h))
        elif script == "generate.py":
            steps.append(Step(section, command, words, "generate", {_option(words, "--checkpoint")}, check_generate))
        else:
            pytest.fail(f"README command not covered by tests/test_readme.py (add a rule or a skip): {command}")
    return steps


def _norm(work, path):
    return os.path.normpath(os.path.join(work, path))


def run_in_order(steps, work, env, logs, width=2):
    """Start each step in README order once the earlier steps on its paths are done, `width` at once; a
    step still waiting lets the next ready one go first (a core would idle meanwhile)."""
    running, done, todo = [], set(), list(range(len(steps)))
    while todo or running:
        for s in [s for s in running if s.proc.poll() is not None]:
            s.seconds = time.perf_counter() - s.t0
            s.out, s.err = (open(f, errors="replace").read() for f in s.logs)
            running.remove(s)
            done.add(id(s))
        ready = [i for i in todo if not _waits(steps, i, done, work)]
        if ready and len(running) < width:
            i = ready[0]
            s = steps[i]
            s.logs = [os.path.join(logs, f"{i:02d}.{kind}") for kind in ("out", "err")]
            with open(s.logs[0], "w") as out, open(s.logs[1], "w") as err:
                s.t0 = time.perf_counter()
                s.proc = subprocess.Popen(["bash", "-c", shlex.join(s.words)], cwd=work, env=env,
                                          stdout=out, stderr=err)
            running.append(s)
            todo.remove(i)
            continue
        time.sleep(0.05)


def _waits(steps, i, done, work):
    """Whether step `i` waits for an earlier step on one of its paths that is not done yet."""
    mine = {_norm(work, p) for p in steps[i].paths if p}
    return any(id(e) not in done and mine & {_norm(work, p) for p in e.paths if p} for e in steps[:i])


# ---------------------------------------------------------------------- what README says each command does
def _ok(s):
    assert s.proc.returncode == 0, f"{s.command}\n{s.err[-3000:]}\n{s.out[-2000:]}"


def check_pretrain(s, work, steps):
    _ok(s)
    run_dir = _run_dir(s.words)
    lines = s.out.splitlines()
    assert f"starting fresh: {run_dir}, {STEPS} steps" in lines, s.out[-3000:]
    assert any(re.match(rf"validation at step 2/{STEPS} \| val loss \d+\.\d+", x) for x in lines), s.out[-3000:]
    assert any(x.startswith(f"done: steps 1-{STEPS} of {STEPS} | train loss ") for x in lines), s.out[-3000:]
    d = os.path.join(work, run_dir)
    assert f"checkpoints: {run_dir}/checkpoints" in lines
    last = [e for e in os.listdir(os.path.join(d, "checkpoints")) if e.endswith("-last")]
    assert len(last) == 1 and last[0].startswith(f"step={STEPS - 1}-"), last
    records = [json.loads(x) for x in open(os.path.join(d, "metrics", "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] for r in records) and any("val_loss" in r for r in records)
    with open(os.path.join(d, "metrics", "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(e.startswith("events.out.tfevents") for e in os.listdir(os.path.join(d, "tensorboard")))


def check_rerun(s, work, steps):
    """README: rerunning a command says what it does; a finished run has nothing to do (and says so fast)."""
    _ok(s)
    run_dir = _run_dir(s.words)
    assert s.out.strip().splitlines() == [f"{run_dir}: latest checkpoint is step {STEPS} >= max_steps {STEPS}; "
                                          "nothing to do — pass a new name= or raise max_steps"], s.out[-2000:]
    assert s.seconds < 3.0, f"{s.seconds:.1f} s"


def check_dry_run(s, work, steps):
    """README's 80B numbers: total / active parameters and the per-GPU memory of its layout."""
    _ok(s)
    text = open(README).read()
    total, active = re.search(r"reports ([\d.]+)B total / ([\d.]+)B active", text).groups()
    gib = re.search(r"~(\d+) GiB per GPU", text).group(1)
    assert f"parameters: total {total}B  active/token {active}B" in s.out, s.out[-2000:]
    m = re.search(r"= ([\d.]+) GiB", s.out)
    assert m and round(float(m.group(1))) == int(gib), (m and m.group(0), gib)
    assert not os.path.exists(os.path.join(work, _run_dir(s.words), "checkpoints"))


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def check_h2n(s, work, steps):
    _ok(s)
    out = _norm(work, _option(s.words, "--output"))
    assert os.path.isfile(os.path.join(out, "weights", ".metadata")) and os.path.isdir(os.path.join(out, "context"))
    parent = os.path.dirname(out)
    assert not [e for e in os.listdir(parent) if ".tmp-" in e], "temporary data left behind"


def check_n2h(s, work, steps):
    """README: the export is bitwise equal to the input; config.json keeps the input's keys and values."""
    _ok(s)
    out = _norm(work, _option(s.words, "--output"))
    h2n = next(e for e in steps if e.kind == "convert_hf_to_nemo.py")
    src = _norm(work, _option(h2n.words, "--input"))
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:  # bitwise: the bytes, not the values (NaN != NaN, -0.0 == 0.0)
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(-1).view(torch.uint8).equal(b[k].contiguous().view(-1).view(torch.uint8)), k
    for name in ("config.json", "generation_config.json"):
        assert json.load(open(os.path.join(out, name))) == json.load(open(os.path.join(src, name))), name


def check_generate(s, work, steps):
    """README: the CLI streams the text and prints prefill and decode tokens/s on stderr."""
    _ok(s)
    prompt = _option(s.words, "--prompt")
    assert s.out.startswith(prompt) and len(s.out) > len(prompt), s.out[:200]
    assert re.search(r"prefill: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); decode: \d+ tokens in [\d.]+ s "
                     r"\([\d.]+ tokens/s\)", s.err), s.err[-2000:]


# ---------------------------------------------------------------------- the test
def _copy_tracked(dst):
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: README's fresh-clone commands need the tracked files")
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):  # a tracked file deleted in the working tree is not copied
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def test_readme_commands_do_what_readme_says(tmp_path):
    from nemo_qwen3_next.testing import random_hf_model, tiny_hf_config

    work = str(tmp_path / "repo")
    _copy_tracked(work)
    hf_dir = str(tmp_path / "hf_in")
    random_hf_model(tiny_hf_config(vocab_size=512), seed=0).save_pretrained(hf_dir)  # room for the byte tokenizer

    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=work, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    steps = plan(open(README).read(), work, hf_dir)
    kinds = {s.kind for s in steps}
    assert {"pretrain", "rerun", "dry_run", "convert_hf_to_nemo.py", "convert_nemo_to_hf.py", "generate"} <= kinds, kinds

    logs = tmp_path / "logs"
    logs.mkdir()
    run_in_order(steps, work, env, str(logs))
    for s in steps:  # the wall times, for the CI budget (pytest -s shows them)
        print(f"{s.seconds:6.1f} s  {'(rerun) ' if s.extra else ''}{shlex.join(s.words)[:150]}")
    for s in steps:
        s.check(s, work, steps)
