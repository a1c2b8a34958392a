"""Pretrain Qwen3-Next with NeMo 2 / Megatron-Core from a Hydra config.

    python examples/pretrain.py                                  # tiny model, embedded data, CPU or GPU
    python examples/pretrain.py trainer.max_steps=50 data.seq_length=256
    torchrun --nproc-per-node 2 examples/pretrain.py parallelism=tp2_sp name=qwen3_next_tiny_tp2
    python examples/pretrain.py --config-name qwen3_next_80b_a3b --dry-run   # counts + memory, no GPU
    torchrun --nproc-per-node 8 --nnodes 4 --node-rank R --rdzv-endpoint HOST:29500 \\
        examples/pretrain.py --config-name qwen3_next_80b_a3b data.paths='[/data/qwen3next_text_document]'

Rerunning the same command resumes from the latest checkpoint in `run_dir` (the first line says
whether it resumes, starts fresh, or has nothing to do). A bad config stops before anything is built,
with one line on stderr naming the field (exit code 2). The console shows a progress bar on a terminal
(one line per logged step in a log file: `logging.progress`), validation losses and a closing summary
(median step time and tokens/s after `logging.timing_warmup_steps`); `logging.verbose=true` adds the
libraries' info logs and the warnings kept off the console (training/console.py).
"""

import contextlib
import difflib
import os
import re
import shutil
import sys
import tempfile

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")


def _fail(msg: str) -> None:
    print(f"pretrain.py: config error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _check_overrides(argv):
    """Compose once up front and check the values: an unknown override or a bad value fails in one
    line (not Hydra's multi-line report) before Hydra creates the run's output directory. Returns run_dir."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_name, overrides = "qwen3_next_tiny", []
    it = iter(argv)
    for arg in it:
        if arg in ("--config-name", "-cn"):
            config_name = next(it, config_name)
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except (HydraException, OmegaConfBaseException) as e:
        m = re.match(r"Could not override '([^']+)'", str(e))
        if m:
            _fail(_unknown_key_message(config_name, m.group(1)))
        _fail(" ".join(str(e).split()) or type(e).__name__)
    try:
        _check_values(raw)
    except _BadConfig as e:
        _fail(str(e))
    return raw.get("run_dir")


def _remove_if_new(run_dir, existed: bool) -> None:
    """A refused first run leaves nothing: Hydra made `run_dir/hydra` (its log) before the checks
    that need the heavy imports ran."""
    if run_dir and not existed and os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {"hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _unknown_key_message(config_name: str, key: str) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    hint = f"add a new key with +{key}=..."
    try:
        with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
            base = compose(config_name=config_name)
        node = OmegaConf.select(base, parent) if parent else base
        if node is not None:
            close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
            if close:
                hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    except Exception:
        pass
    return f"{key} is not a config field; {hint}"


_VALUE_OPTIONS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                  "--package", "-p", "--experimental-rerun"}


def _options_first(args):
    """Hydra's parser wants its options before the overrides; accept them in any order."""
    options, overrides = [], []
    it = iter(args)
    for arg in it:
        if arg in _VALUE_OPTIONS:
            options += [arg, next(it, "")]
        elif arg.startswith("-"):
            options.append(arg)
        else:
            overrides.append(arg)
    return options + overrides


class _BadConfig(Exception):
    pass


@contextlib.contextmanager
def _hold_output():
    """Hold back what goes to stdout and stderr (fds 1 and 2: Hydra logs the imports' warnings to
    stdout) meanwhile; replay each only if the block succeeds."""
    with contextlib.ExitStack() as stack:
        held = {}
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            held[fd] = (os.dup(fd), stack.enter_context(tempfile.TemporaryFile()), stream)
            os.dup2(held[fd][1].fileno(), fd)
        ok = False
        try:
            yield
            ok = True
        finally:
            for fd, (saved, buf, stream) in held.items():
                stream.flush()
                os.dup2(saved, fd)
                os.close(saved)
                if ok:
                    buf.seek(0)
                    os.write(fd, buf.read())


def _world_size(raw) -> int:
    if raw.get("dry_run"):  # the layout the config describes, not this process
        p = raw.get("parallelism") or {}
        return (p.get("devices") or 1) * ((raw.get("trainer") or {}).get("num_nodes") or 1)
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_values(raw):
    """The typed config, checked with stdlib code only (types, signs, paths, parallel sizes): a bad
    value answers in well under a second, before torch / Megatron / NeMo are imported."""
    from nemo_qwen3_next.field_checks import ConfigError
    from nemo_qwen3_next.training import config as train_config

    try:
        return train_config.validate(raw, _world_size(raw), model_keys=False)
    except ConfigError as e:
        raise _BadConfig(str(e)) from None


def _check_model(tc):
    """The recipe module after the checks that need the heavy imports (model keys, the model config
    itself, the accelerator); `_BadConfig` (one line) if anything is wrong. Nothing is allocated."""
    from nemo_qwen3_next.field_checks import ConfigError

    try:
        if not tc.dry_run and tc.trainer.accelerator == "gpu":
            import torch  # ~1 s; NeMo's imports take ~10 s more

            if not torch.cuda.is_available():
                raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; run on GPUs, set "
                                  "trainer.accelerator=auto, or inspect the config with --dry-run.")
        from nemo_qwen3_next.training import config as train_config
        from nemo_qwen3_next.training import recipe

        train_config.check_model_keys(tc.model)
        if not tc.dry_run:
            recipe.model_config(tc, recipe.on_cpu(tc))
            recipe.check_run_options(tc)
        return recipe
    except ConfigError as e:
        raise _BadConfig(str(e)) from None


_OWN_OPTIONS = """Options besides Hydra's:
  --dry-run    parameter counts and the per-GPU memory of the config's layout; nothing is allocated,
               no GPU needed (the same as dry_run=true)
"""

if __name__ == "__main__":  # the checkpoint writer spawns processes that re-import this file
    if any(a in ("--help", "-h") for a in sys.argv[1:]):  # ours first, then Hydra's groups and config
        print(__doc__.strip() + "\n\n" + _OWN_OPTIONS, flush=True)
    sys.argv = [sys.argv[0]] + _options_first([("dry_run=true" if a == "--dry-run" else a) for a in sys.argv[1:]])
    run_dir = _check_overrides(sys.argv[1:])
    run_dir_existed = bool(run_dir) and os.path.exists(run_dir)

    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=CONF_DIR, config_name="qwen3_next_tiny", version_base=None)
    def main(cfg: DictConfig) -> None:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        from nemo_qwen3_next.training.console import quiet_console

        quiet_console(bool((raw.get("logging") or {}).get("verbose")))  # before the imports that log
        try:
            tc = _check_values(raw)
            if not tc.dry_run:
                from nemo_qwen3_next.training.run_plan import plan

                what, todo = plan(tc)
                if not todo:  # a finished run's rerun answers at once, before the heavy imports
                    if os.environ.get("RANK", "0") == "0":
                        print(what, flush=True)
                    return
            with _hold_output():  # a bad config prints one line, not the imports' warnings
                recipe = _check_model(tc)
        except _BadConfig as e:
            _remove_if_new(run_dir, run_dir_existed)
            _fail(str(e))
        if tc.dry_run:
            from nemo_qwen3_next.training.dry_run import report

            print(report(recipe.model_config(tc, cpu=True), tc), flush=True)
            return
        from hydra.core.hydra_config import HydraConfig

        from nemo_qwen3_next.kernel_cache import configure_kernel_cache

        # before anything compiles: TileLang/Triton kernels persist per machine (docs/performance.md)
        cache = configure_kernel_cache()
        recipe.run(tc, label=HydraConfig.get().runtime.choices.get("model", ""), kernel_cache=cache)

    main()
