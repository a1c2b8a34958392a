"""Pretraining configs: bad configs fail early in one line; FLOPs; tokenizer; embedded corpus;
the 80B config on the meta device."""

import os
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")


def _cli(args, tmp_path, env_extra=None, timeout=300):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, PRETRAIN, f"run_dir={run_dir}", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, run_dir


def _one_line_error(proc, run_dir):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("pretrain.py: config error: ")
    assert proc.stdout == "", proc.stdout[-3000:]  # the imports' warnings held back too
    assert not run_dir.exists(), sorted(os.listdir(run_dir))  # nothing written, Hydra's log dir included
    return lines[0]


PREPARED_TEXTS = ["first document, with ünïcode", "second\nline two", "third"]


def _prepare_data(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"body": %s}\n' % __import__("json").dumps(t) for t in PREPARED_TEXTS))
    out = tmp_path / "out" / "docs_text_document"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_pretraining_data.py"),
                           "--input", str(src), "--tokenizer", "byte", "--json-key", "body",
                           "--output-prefix", str(out), "--workers", "2"], capture_output=True, text=True, timeout=300)
    return proc, out


SLOW_CLI = {  # the runs that import NeMo or Megatron before they answer (10-20 s each), longest first
    "dry_run": lambda d: _cli(["--config-name", "qwen3_next_80b_a3b", "--dry-run"], d, timeout=600),
    "unknown_model_field": lambda d: _cli(["+model.num_expertz=4"], d),
    "wrong_layer_types": lambda d: _cli(["model.layer_types=[linear_attention,full_attention]"], d),
    "prepare_data": _prepare_data,
}


@pytest.fixture(scope="module")
def slow_cli(tmp_path_factory):
    """`SLOW_CLI`'s runs, started when the first test asks, two at a time (one core each, two cores):
    name -> future of its result, so the tests between run meanwhile."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in SLOW_CLI}
    pool = ThreadPoolExecutor(2)
    yield {name: pool.submit(run, dirs[name]) for name, run in SLOW_CLI.items()}
    pool.shutdown()


def test_unknown_field_fails_in_one_line(tmp_path):
    proc, run_dir = _cli(["trainer.max_stepz=3"], tmp_path)
    line = _one_line_error(proc, run_dir)
    assert "trainer.max_stepz" in line and "trainer.max_steps" in line


def test_unknown_model_field_fails_in_one_line(slow_cli):
    proc, run_dir = slow_cli["unknown_model_field"].result()
    line = _one_line_error(proc, run_dir)
    assert "model.num_expertz" in line and "num_moe_experts" in line


def test_wrong_layer_types_length_fails_in_one_line(slow_cli):
    proc, run_dir = slow_cli["wrong_layer_types"].result()
    line = _one_line_error(proc, run_dir)
    assert "layer_types has 2 entries" in line and "num_layers = 4" in line


def test_parallel_sizes_not_dividing_world_size_fail_in_one_line(tmp_path):
    proc, run_dir = _cli(["parallelism=tp2_sp"], tmp_path, env_extra={"WORLD_SIZE": "3"})
    line = _one_line_error(proc, run_dir)
    assert "world size 3" in line and "tensor(2)" in line


def test_validate_names_the_field():
    from nemo_qwen3_next.config import ConfigError
    from nemo_qwen3_next.training.config import validate

    with pytest.raises(ConfigError, match=r"parallelism\.sequence_parallel must be true"):
        validate({"parallelism": {"tensor_model_parallel_size": 2}}, world_size=2)
    with pytest.raises(ConfigError, match=r"data\.global_batch_size \(6\)"):
        validate({"data": {"micro_batch_size": 4, "global_batch_size": 6}}, world_size=1)
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size"):
        validate({"parallelism": {"expert_model_parallel_size": 4}}, world_size=2)
    with pytest.raises(ConfigError, match=r"optim\.lrr .*optim\.lr\?"):
        validate({"optim": {"lrr": 1.0}}, world_size=1)


# ---------------------------------------------------------------------- FLOPs
def _naive_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Plain-matmul attention, so torch's flop counter sees the score and value products."""
    if enable_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_flops_match_torch_flop_counter(monkeypatch):
    """Our analytic count against torch's FlopCounterMode on the real tiny model's forward.

    Projections, experts (routed tokens x top-k), router and LM head must match exactly; the
    attention core is counted causally by us and in full by plain-matmul attention (ratio 2s/(s+1));
    the GDN chunked rule (we count the GPU kernel's products, the CPU reference computes it
    differently) must agree within 2x."""
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_qwen3_next import build_model, init_single_process, qwen3_next_tiny_5m
    from nemo_qwen3_next.training.flops import forward_flops_per_token

    init_single_process()
    cfg = qwen3_next_tiny_5m(use_cpu_initialization=True, moe_router_dtype=None)
    model = build_model(cfg).eval()
    b, s = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(s).expand(b, s)
    counter = FlopCounterMode(display=False)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _naive_sdpa)
    with torch.no_grad(), counter:
        model(ids, pos, None)
    per_module = counter.get_flop_counts()
    total = sum(per_module["Global"].values())

    def module_flops(pred):
        return sum(sum(ops.values()) for name, ops in per_module.items()
                   if name != "Global" and pred(name))

    linear_names = ("in_proj", "out_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router",
                    "output_layer")
    leaf = lambda n: n.rsplit(".", 1)[-1] in linear_names  # noqa: E731
    measured_linear = module_flops(leaf)
    ours = forward_flops_per_token(cfg, s)
    tokens = b * s
    h = cfg.hidden_size
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    attn_layers = cfg.layer_types.count("full_attention")
    attn_core = attn_layers * 2 * 2 * n * d * (s + 1) / 2
    hk, hv, dk, dv, w = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                         cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim)
    gdn_layers = cfg.layer_types.count("linear_attention")
    gdn_conv = gdn_layers * 2 * w * (2 * hk * dk + hv * dv)
    gdn_rule = ours["gdn"] - gdn_conv - gdn_layers * (2 * h * (2 * hk * dk + 2 * hv * dv + 2 * hv) + 2 * hv * dv * h)
    shared_gate = cfg.num_layers * 2 * h
    ours_linear = (ours["total"] - attn_core - gdn_conv - gdn_rule - shared_gate) * tokens
    assert measured_linear == pytest.approx(ours_linear, rel=1e-6)

    sdpa = module_flops(lambda nm: nm.endswith("self_attention.core_attention"))
    assert sdpa == pytest.approx(attn_core * tokens * 2 * s / (s + 1), rel=1e-6)
    rest = total - measured_linear - sdpa  # GDN rule + conv + shared-expert gate + small ops
    ours_rest = (gdn_rule + gdn_conv + shared_gate) * tokens
    assert 0.5 < rest / ours_rest < 2.0, (rest, ours_rest)


def test_train_flops_are_three_forwards():
    from nemo_qwen3_next import qwen3_next_80b_a3b
    from nemo_qwen3_next.training.flops import forward_flops_per_token, train_flops_per_step

    cfg = qwen3_next_80b_a3b()
    fwd = forward_flops_per_token(cfg, 4096)
    assert train_flops_per_step(cfg, 4096, 8) == pytest.approx(3 * fwd["total"] * 4096 * 8)
    # ~3B active parameters -> roughly 2 x 3B FLOPs per token plus attention; GDN does not grow with s.
    assert 5e9 < fwd["total"] < 12e9
    assert forward_flops_per_token(cfg, 32768)["gdn"] == fwd["gdn"]
    assert forward_flops_per_token(cfg, 32768)["attention"] > fwd["attention"]


# ---------------------------------------------------------------------- data
def test_byte_tokenizer_round_trip():
    from nemo_qwen3_next.training.tokenizer import ByteTokenizer

    tok = ByteTokenizer(512)
    text = "Grüße, 世界! tabs\tand\nnewlines"
    ids = tok.text_to_ids(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.ids_to_text(ids + [tok.eod]) == text
    assert tok.eod == 256 and tok.pad == 257 and tok.vocab_size == 512


def test_embedded_corpus_is_a_readable_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from nemo_qwen3_next.training.data import build_embedded_corpus, stdlib_documents
    from nemo_qwen3_next.training.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    prefix = build_embedded_corpus(str(tmp_path), tok, max_bytes=100_000)
    ds = IndexedDataset(prefix)
    first = next(iter(stdlib_documents()))
    assert len(ds) >= 2
    doc0 = ds[0].tolist()
    assert doc0[-1] == tok.eod and tok.ids_to_text(doc0[:-1]) == first
    assert sum(len(ds[i]) for i in range(len(ds))) >= 100_000
    assert build_embedded_corpus(str(tmp_path), tok, max_bytes=100_000) == prefix  # reused, not rebuilt
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


# ---------------------------------------------------------------------- 80B on the meta device
def _analytic_params(c):
    """Qwen3-Next parameter count from the architecture alone (HF module shapes)."""
    h, v = c.hidden_size, c.vocab_size
    n, g, d = c.num_attention_heads, c.num_query_groups, c.kv_channels
    hk, hv, dk, dv, w = (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                         c.linear_value_head_dim, c.linear_conv_kernel_dim)
    e, f, fs = c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_shared_expert_intermediate_size
    attn = h * n * d * 2 + 2 * h * g * d + n * d * h + 2 * d
    gdn = h * (2 * hk * dk + 2 * hv * dv + 2 * hv) + (2 * hk * dk + hv * dv) * w + 2 * hv + dv + hv * dv * h
    experts = e * 3 * h * f
    moe_dense = e * h + 3 * h * fs + h
    total = 2 * v * h + h
    for t in c.layer_types:
        total += (attn if t == "full_attention" else gdn) + experts + moe_dense + 2 * h
    return total, experts * c.num_layers


def test_80b_dry_run_counts_and_memory_without_allocating(slow_cli):
    from nemo_qwen3_next import qwen3_next_80b_a3b

    proc, _ = slow_cli["dry_run"].result()
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child waited for so far
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    line = next(line for line in out.splitlines() if line.startswith("parameters:"))
    total_b = float(line.split("total ")[1].split("B")[0])
    active_b = float(line.split("active/token ")[1].split("B")[0])
    expected_total, expected_experts = _analytic_params(qwen3_next_80b_a3b())
    assert total_b == pytest.approx(expected_total / 1e9, abs=0.006)
    assert 79 < total_b < 82 and 2.5 < active_b < 4.5
    cfg = qwen3_next_80b_a3b()
    expected_active = expected_total - expected_experts * (1 - cfg.moe_router_topk / cfg.num_moe_experts)
    assert active_b == pytest.approx(expected_active / 1e9, abs=0.006)
    mem = next(line for line in out.splitlines() if line.startswith("per-GPU memory estimate"))
    gib = float(mem.rsplit("= ", 1)[1].split(" GiB")[0])
    assert 20 < gib < 80, mem  # fits an 80 GB H100 in this layout
    assert "TP=2 PP=4" in out and "EP=8" in out
    # 80B parameters in bf16 are 160 GB; the process stayed far below that (imports included).
    assert peak_kib < 4 * 1024 * 1024, peak_kib


def test_prepare_data_script_writes_readable_documents(slow_cli):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    proc, out = slow_cli["prepare_data"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = IndexedDataset(str(out))
    assert len(ds) == 3
    for i, text in enumerate(PREPARED_TEXTS):
        ids = ds[i].tolist()
        assert ids[-1] == 256 and bytes(ids[:-1]).decode("utf-8") == text


def test_expert_load_metrics():
    from nemo_qwen3_next.training.callbacks import ExpertLoad

    class Router(torch.nn.Module):  # Megatron's router returns (probs, routing_map [tokens, experts])
        def forward(self, routing_map):
            return None, routing_map

    class Layer(torch.nn.Module):
        def __init__(self, index):
            super().__init__()
            self.layer_index, self.mlp = index, torch.nn.Module()
            self.mlp.router = Router()

    model = torch.nn.ModuleList(Layer(i) for i in range(3))
    load = ExpertLoad(num_layers=3, num_experts=4)
    assert load.attach(model) == 3

    def route(layer, experts_of_tokens):  # one routed expert per token
        model[layer].mlp.router(torch.nn.functional.one_hot(torch.tensor(experts_of_tokens), 4).bool())

    route(0, [0] * 8)  # one expert takes every routed token
    route(1, [0, 1, 2, 3] * 2)  # perfectly balanced
    route(2, [0, 0, 0, 1])
    model.eval()
    route(2, [3] * 10)  # evaluation batches are not counted
    m = load.collect()
    assert m["moe/layer00_imbalance"] == pytest.approx(4.0) and m["moe/layer00_entropy"] == pytest.approx(0.0)
    assert m["moe/layer01_imbalance"] == pytest.approx(1.0) and m["moe/layer01_entropy"] == pytest.approx(1.0)
    p = torch.tensor([0.75, 0.25])
    assert m["moe/layer02_imbalance"] == pytest.approx(3.0)
    assert m["moe/layer02_entropy"] == pytest.approx(float(-(p * p.log()).sum() / torch.log(torch.tensor(4.0))))
    assert m["moe/imbalance_max"] == pytest.approx(4.0)
    assert load.counts.sum() == 0  # reset after collecting
    assert load.collect() == {}


# ---------------------------------------------------------------------- reduced model, mock data, run plan
def _compose(*overrides, world_size=1):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_qwen3_next.training.config import validate

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        raw = OmegaConf.to_container(compose(config_name="qwen3_next_tiny", overrides=list(overrides)), resolve=True)
    return validate(raw, world_size=world_size)


def test_reduced_model_conf_is_the_benchmarks_bare_model():
    """model=qwen3_next_reduced must time the model examples/bench_model.py times as the bare step."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    from nemo_qwen3_next.training import recipe
    from nemo_qwen3_next.training.dry_run import count_parameters

    tc = _compose("model=qwen3_next_reduced", "data=mock", "trainer.precision=bf16-mixed")
    ours, bare = recipe.model_config(tc, cpu=True), bench_model.reduced_config()
    fields = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "linear_conv_kernel_dim", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_norm_topk_prob", "moe_router_dtype",
              "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_grouped_gemm", "vocab_size", "rotary_base",
              "rotary_percent", "tie_word_embeddings", "layer_types", "bf16", "params_dtype"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(bare, f) for f in fields}
    assert ours.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (tc.data.mock, tc.data.seq_length, tc.data.micro_batch_size) == (True, 4096, 2)  # the bare step's B=2 T=4096
    assert round(count_parameters(ours)["total"] / 1e9, 2) == 1.57  # issue 10's count of the bare model


def test_mock_dataset_is_deterministic_random_tokens_at_the_vocab_size():
    import numpy as np

    from nemo_qwen3_next.training.data import MockDataset

    a = MockDataset(151936, 64, 100, seed=7, split="train")
    s = a[3]
    rng = np.random.default_rng([7, 0, 3])  # the documented draw: (seed, split, index)
    ids = torch.from_numpy(rng.integers(151936, size=65, dtype=np.int64))
    assert torch.equal(s["tokens"], ids[:-1]) and torch.equal(s["labels"], ids[1:])
    assert torch.equal(MockDataset(151936, 64, 100, seed=7, split="train")[3]["tokens"], s["tokens"])
    assert not torch.equal(MockDataset(151936, 64, 100, seed=8, split="train")[3]["tokens"], s["tokens"])
    assert not torch.equal(MockDataset(151936, 64, 100, seed=7, split="validation")[3]["tokens"], s["tokens"])
    many = torch.cat([a[i]["tokens"] for i in range(100)])
    assert many.min() >= 0 and many.max() < 151936 and many.max() > 151936 * 0.99  # uniform over the vocab
    assert s["attention_mask"].shape == (1, 1, 1) and not s["attention_mask"].any()  # nothing masked but causal
    assert torch.equal(s["position_ids"], torch.arange(64)) and bool((s["loss_mask"] == 1).all())


def test_loss_figure_has_train_val_lr_and_title():
    from nemo_qwen3_next.training.callbacks import loss_figure

    records = {1: {"step": 1, "loss": 6.0, "lr": 1e-3}, 2: {"step": 2, "loss": 5.0, "lr": 2e-3, "val_loss": 5.5},
               3: {"step": 3, "loss": 4.0, "lr": 1e-3}, 4: {"step": 4, "loss": 3.5, "lr": 5e-4, "val_loss": 3.9}}
    fig = loss_figure(records, "qwen3_next_tiny_5m | run r1")
    ax, ax_lr = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train loss"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["val loss"].get_xdata()) == [2, 4] and list(lines["val loss"].get_ydata()) == [5.5, 3.9]
    assert list(ax_lr.get_lines()[0].get_ydata()) == [1e-3, 2e-3, 1e-3, 5e-4] and ax_lr.get_ylabel() == "learning rate"
    assert ax.get_title() == "qwen3_next_tiny_5m | run r1"


def test_run_plan_reads_the_checkpoint_nemo_resumes_from(tmp_path):
    from nemo_qwen3_next.training import recipe

    tc = _compose(f"run_dir={tmp_path}", "trainer.max_steps=60")
    assert recipe.plan(tc) == (f"starting fresh: {tmp_path}, 60 steps", True)
    ck = tmp_path / "checkpoints"
    (ck / "step=49-consumed_samples=400.0").mkdir(parents=True)
    (ck / "step=49-consumed_samples=400.0-last").mkdir()
    assert recipe.plan(tc) == (f"resuming {tmp_path} from step 50 (step=49-consumed_samples=400.0-last) to max_steps 60",
                               True)
    (ck / "step=199-consumed_samples=1600.0-last").mkdir()  # newer, but still being written
    (ck / "step=199-consumed_samples=1600.0-last-unfinished").touch()
    assert "from step 50 " in recipe.plan(tc)[0]
    (ck / "step=199-consumed_samples=1600.0-last-unfinished").unlink()
    os.utime(ck / "step=199-consumed_samples=1600.0-last")
    assert recipe.plan(tc) == (f"{tmp_path}: latest checkpoint is step 200 >= max_steps 60; nothing to do "
                               "— pass a new name= or raise max_steps", False)
    fresh = _compose(f"run_dir={tmp_path}", "checkpoint.resume=false")
    assert recipe.plan(fresh)[0].endswith("(checkpoint.resume=false: the checkpoints already there are not used)")


def test_run_options_fail_in_one_named_line():
    from nemo_qwen3_next.config import ConfigError
    from nemo_qwen3_next.training import recipe

    assert recipe.progress_mode(_compose("logging.progress=lines")) == "lines"
    with pytest.raises(ConfigError, match=r"logging\.progress = 'barr' is not one of auto, bar, lines"):
        recipe.check_run_options(_compose("logging.progress=barr"))
    with pytest.raises(ConfigError, match=r"data=mock .* set parallelism\.context_parallel_size=1"):
        recipe.check_run_options(_compose("data=mock", "parallelism.context_parallel_size=2", world_size=2))
    recipe.check_run_options(_compose("data=mock"))


def test_resumed_run_drops_the_records_it_logs_again(tmp_path):
    """A run resumed from step 3 logs steps 4.. again: their old records (and a line a kill cut short)
    go first, so metrics.jsonl keeps one record per step."""
    import json

    from nemo_qwen3_next.training.callbacks import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 7.0 - i}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    drop_records_after(str(path), 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.0}, {"step": 3, "loss": 4.0}]
    drop_records_after(str(tmp_path / "absent.jsonl"), 3)  # a fresh run has none


def test_quiet_console_drops_library_noise_but_not_other_warnings():
    """The warnings no user can act on (e.g. Megatron's fused_indices_to_multihot deprecation at import,
    NeMo's "Unknown MLP type" per layer) stay off the console; any other warning still shows, and
    `logging.verbose=true` shows everything."""
    import io
    import logging
    import warnings

    from nemo_qwen3_next.training import console

    noise = ("fused_indices_to_multihot has reached end of life. Please migrate to a non-experimental function.",
             "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. Using default kwargs.")
    real = "data.num_workers=0: the data loader runs in the training process"
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root, nemo = logging.getLogger(), logging.getLogger("nemo_logger")
    propagate = nemo.propagate
    root.addHandler(handler)
    nemo.addHandler(handler)
    nemo.propagate = False  # as once NeMo is imported: its records reach the console through its own handler
    try:
        console.quiet_console(verbose=True)
        logging.getLogger("megatron.core.utils").warning(noise[0])
        assert buf.getvalue().splitlines() == [noise[0]]
        buf.truncate(0), buf.seek(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            console.quiet_console(verbose=False)
            for msg in (*noise, real):
                logging.getLogger("megatron.core.transformer").warning(msg)
                nemo.warning(msg)
                warnings.warn(msg, UserWarning)
        assert buf.getvalue().splitlines() == [real, real]  # Megatron's record and NeMo's
        assert [str(w.message) for w in caught] == [real]
    finally:
        root.removeHandler(handler)
        nemo.removeHandler(handler)
        nemo.propagate = propagate
        for h in [*root.handlers, handler]:
            h.removeFilter(console._DROP)
        nemo.removeFilter(console._DROP)


def test_help_lists_dry_run_and_the_groups(tmp_path):
    """`--help` shows the script's usage and own option (--dry-run) before Hydra's groups, at once."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, PRETRAIN, "--help"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--dry-run" in proc.stdout.split("== Configuration groups ==")[0]
    assert re.search(r"^model: .*qwen3_next_80b_a3b", proc.stdout, re.M)  # Hydra's part follows
    assert time.perf_counter() - t0 < 3.0
