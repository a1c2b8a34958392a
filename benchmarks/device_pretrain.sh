#!/usr/bin/env bash
# Issue 4's GPU pretraining runs (and issue 5's GPU tests) on the device machine, kind nvidia-h200-x2.
# Usage (device, repo root): bash benchmarks/device_pretrain.sh STEP[:SECONDS] ...
#
# The NeMo stack and the kernel stack do not fit one 64 MiB carry, so a session makes two calls
# back to back (the machine stays warm 30 s between calls):
#   call 1, carry [".devwheels/nemo", ".devwheels/core"]:  install smoke:150 smoke2:150
#   call 2, carry [".devwheels/bundle", ".devwheels/fq", ".devwheels/cache"]:  unpack one_gpu:480
#   call 3, no carry:  two_gpu:540
# Steps:
#   install  pip-install the NeMo wheel set (benchmarks/stage_nemo_wheels.sh) into /tmp/nemosite and
#            megatron-core 0.15.3 + hydra into /tmp/site
#   smoke    3 steps of the tiny config on GPU 0 with the plain-torch GDN (the NeMo GPU path, no fla)
#   smoke2   the same with TP=2+SP on both GPUs (torchrun, NCCL)
#   unpack   the kernel stack: fla-core, TileLang, FlashQLA (benchmarks/device_run.sh's bundle)
#   one_gpu  GPU 0: the ~1B model, one GPU.  GPU 1 meanwhile: tests/test_gpu_gdn.py, then the tiny model.
#   two_gpu  both GPUs: the ~1B model with TP=2+SP, then the tiny model data-parallel (DP=2).
#   tiny_dp2 both GPUs: only the tiny model data-parallel (DP=2).
#   moe_ab   the ~1B model on one GPU each, at once: GPU 0 with QWEN3_NEXT_MOE_EXPERTS=grouped_mm,
#            GPU 1 with the default expert loop (same command otherwise: tokens/s side by side).
#   moe_bench examples/benchmark.py's MoE block at 80B-A3B widths (512 experts), grouped_mm on GPU 0 and
#            the loop on GPU 1 at once (what wrote benchmarks/results/h200_moe_*.json).
#   oneb_tp2 both GPUs: the ~1B model with TP=2+SP (QWEN3_NEXT_MOE_EXPERTS as exported by the caller).
#   reduced_loop GPU 0: the reduced 80B-A3B model through the NeMo loop (data=mock, 30 steps), cold then warm
#            kernel cache (docs/performance.md); needs install + unpack first.
# Each run's stdout, metrics.jsonl and loss_curve.png go into $OUT/pretrain_results.tgz.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/res /tmp/runs
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/nemosite:/tmp/site:$PWD
mkdir -p .tlcache/tl .tlcache/triton
export TILELANG_CACHE_DIR=$PWD/.tlcache/tl TRITON_CACHE_DIR=$PWD/.tlcache/triton
t0=$(date +%s)

# 1B: seq 2048, 32 x 2048 = 65,536 tokens per step; checkpoints only at the end, weights only.
ONEB="model=qwen3_next_1b trainer.precision=bf16-mixed data.seq_length=2048 data.micro_batch_size=4 \
data.global_batch_size=32 optim.lr=${ONEB_LR:-3e-4} optim.warmup_steps=10 trainer.max_steps=${ONEB_STEPS:-80} \
trainer.val_check_interval=${ONEB_STEPS:-80} checkpoint.every_n_steps=1000 checkpoint.save_optim_on_train_end=false"
TINY="trainer.precision=bf16-mixed trainer.max_steps=${TINY_STEPS:-200}"

pretrain() {  # name, limit, gpus ("0" or "0,1"), args...
  local name=$1 lim=$2 gpus=$3; shift 3
  local n=$(( $(echo "$gpus" | tr -cd , | wc -c) + 1 ))
  local launch="python3"
  [ "$n" -gt 1 ] && launch="torchrun --standalone --nproc-per-node $n"
  echo "[$name] QWEN3_NEXT_MOE_EXPERTS=${QWEN3_NEXT_MOE_EXPERTS:-auto} CUDA_VISIBLE_DEVICES=$gpus $launch examples/pretrain.py $* run_dir=/tmp/runs/$name data.cache_dir=/tmp/runs/data_$name" \
    | tee /tmp/res/$name.cmd
  local s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 "$lim" $launch examples/pretrain.py "$@" run_dir=/tmp/runs/$name \
    data.cache_dir=/tmp/runs/data_$name > /tmp/res/$name.log 2>&1
  local rc=$?
  echo "[$name] rc=$rc took $(( $(date +%s) - s )) s" | tee -a /tmp/res/$name.cmd
  cp /tmp/runs/$name/metrics/metrics.jsonl /tmp/res/$name.metrics.jsonl 2>/dev/null
  cp /tmp/runs/$name/metrics/loss_curve.png /tmp/res/$name.loss_curve.png 2>/dev/null
  cp /tmp/runs/$name/metrics/summary.json /tmp/res/$name.summary.json 2>/dev/null
  grep -a "implementations\|^step " /tmp/res/$name.log | sed -n '1,3p;$p'
  [ $rc -ne 0 ] && tail -25 /tmp/res/$name.log
  return $rc
}

gpu_tests() {  # on GPU 1, the tiny-model and recurrent checks first (the earlier sessions never reached them)
  CUDA_VISIBLE_DEVICES=1 timeout -k 5 "$1" python3 -m pytest -q -s -p no:cacheprovider \
    "tests/test_gpu_gdn.py::test_tiny_model_gpu_bf16_logits_vs_cpu_fp32" \
    "tests/test_gpu_gdn.py::test_recurrent_kernel_matches_chunk_forward" \
    "tests/test_gpu_gdn.py::test_gdn_packed_equals_per_document" \
    "tests/test_gpu_gdn.py::test_gdn_fused_bf16_vs_fp32_reference" > /tmp/res/gpu_tests.log 2>&1
  echo "gpu tests rc=$?"; tail -30 /tmp/res/gpu_tests.log
}

for item in "$@"; do
  step=${item%%:*}; lim=${item#*:}; [ "$lim" = "$item" ] && lim=300
  s=$(date +%s); echo "===== $step (limit $lim s) at $(( s - t0 )) s"
  case $step in
    install)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nemosite .devwheels/nemo/*.whl &&
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/core/*.whl &&
      python3 -c "import transformers, huggingface_hub, lightning, megatron.core, nemo, torch; print('transformers', transformers.__version__, 'hub', huggingface_hub.__version__, 'lightning', lightning.__version__, 'mcore', megatron.core.__version__, 'nemo', nemo.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ;;
    smoke) pretrain smoke "$lim" 0 +model.linear_attention_backend=torch trainer.precision=bf16-mixed trainer.max_steps=3 ;;
    smoke2) pretrain smoke2 "$lim" 0,1 parallelism=tp2_sp +model.linear_attention_backend=torch \
              trainer.precision=bf16-mixed trainer.max_steps=3 ;;
    unpack)
      if [ ! -d /tmp/site/fla ]; then
        tar -C /tmp -xJf .devwheels/bundle/bundle.tar.xz site || exit 1
        for w in .devwheels/fq/*.whl; do python3 -m zipfile -e "$w" /tmp/site/ || exit 1; done
      fi
      [ -f .devwheels/cache/tlcache.tgz ] && tar -xzf .devwheels/cache/tlcache.tgz && echo "restored .tlcache"
      python3 -c "import torch, triton, fla, tilelang, flash_qla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'tilelang', tilelang.__version__, 'flash_qla', flash_qla.__version__)" ;;
    one_gpu)
      pretrain gpu1_1b "$lim" 0 $ONEB &
      p0=$!
      ( gpu_tests $(( lim / 2 )); pretrain gpu1_tiny $(( lim / 2 - 10 )) 1 $TINY ) &
      p1=$!
      wait $p0 $p1 ;;
    final)  # one call for what is left when device time is short: ~1B on 1 GPU (+ the tiny-model test on
            # GPU 1 meanwhile), then ~1B with TP=2+SP and the tiny model DP=2 on both GPUs
      pretrain gpu1_1b $(( lim * 4 / 10 )) 0 $ONEB &
      p0=$!
      st=$(date +%s)
      CUDA_VISIBLE_DEVICES=1 timeout -k 5 $(( lim * 3 / 10 )) python3 -m pytest -q -s -p no:cacheprovider \
        "tests/test_gpu_gdn.py::test_tiny_model_gpu_bf16_logits_vs_cpu_fp32" > /tmp/res/gpu_tests_tiny.log 2>&1
      echo "tiny-model test rc=$?"; grep -a "tiny model\|passed\|failed\|Error" /tmp/res/gpu_tests_tiny.log | tail -5
      left=$(( lim * 4 / 10 - ($(date +%s) - st) ))  # GPU 1 is free until the 1B run ends: the layer checks
      [ $left -gt 30 ] && CUDA_VISIBLE_DEVICES=1 timeout -k 5 $left python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_gpu_gdn.py -k "packed or bf16_vs_fp32" > /tmp/res/gpu_tests_layer.log 2>&1
      echo "layer tests rc=$?"; grep -a "err\|passed\|failed\|Error" /tmp/res/gpu_tests_layer.log | tail -8
      wait $p0
      pretrain gpu2_1b_tp2 $(( lim * 4 / 10 )) 0,1 $ONEB parallelism=tp2_sp
      pretrain gpu2_tiny_dp2 $(( lim * 2 / 10 - 15 )) 0,1 $TINY ;;
    tiny_dp2) pretrain gpu2_tiny_dp2 "$lim" 0,1 $TINY ;;
    reduced_loop)  # issue 10: the reduced 80B-A3B model (1.57B) through the NeMo loop on mock tokens, B=2 T=4096,
                   # twice on GPU 0: cold, then warm kernel cache (nemo_qwen3_next.kernel_cache, keyed dir)
      unset TILELANG_CACHE_DIR TRITON_CACHE_DIR
      export QWEN3_NEXT_KERNEL_CACHE=$PWD/.tlcache/kc
      RED="model=qwen3_next_reduced data=mock trainer.precision=bf16-mixed trainer.max_steps=30 \
trainer.val_check_interval=1000 checkpoint.every_n_steps=100000 checkpoint.save_last=false"
      pretrain gpu1_reduced_cold $(( lim * 6 / 10 )) 0 $RED
      pretrain gpu1_reduced_warm $(( lim * 4 / 10 )) 0 $RED
      for n in gpu1_reduced_cold gpu1_reduced_warm; do
        echo "$n: $(grep -c 'begins to compile' /tmp/res/$n.log) TileLang compiles"; grep -a "^speed:\|^kernel cache:" /tmp/res/$n.log
      done ;;
    moe_ab)
      QWEN3_NEXT_MOE_EXPERTS=grouped_mm pretrain gpu1_1b_grouped "$lim" 0 $ONEB &
      p0=$!
      QWEN3_NEXT_MOE_EXPERTS=sequential pretrain gpu1_1b_loop "$lim" 1 $ONEB &
      p1=$!
      wait $p0 $p1 ;;
    moe_bench)
      for gi in 0:grouped_mm 1:sequential; do
        g=${gi%%:*} impl=${gi#*:}
        cmd="python3 examples/benchmark.py --modules moe --impls ours --shapes 1x4096,4x4096,8x4096 --out /tmp/res/h200_moe_$impl.json"
        echo "QWEN3_NEXT_MOE_EXPERTS=$impl CUDA_VISIBLE_DEVICES=$g $cmd" | tee /tmp/res/h200_moe_$impl.cmd
        ( QWEN3_NEXT_MOE_EXPERTS=$impl CUDA_VISIBLE_DEVICES=$g timeout -k 5 "$lim" $cmd > /tmp/res/h200_moe_$impl.log 2>&1
          echo "moe_bench $impl rc=$?"; grep -a "^ *moe " /tmp/res/h200_moe_$impl.log ) &
      done
      wait ;;
    oneb_tp2) pretrain gpu2_1b_tp2_${QWEN3_NEXT_MOE_EXPERTS:-auto} "$lim" 0,1 $ONEB parallelism=tp2_sp ;;
    two_gpu)
      pretrain gpu2_1b_tp2 $(( lim * 7 / 10 )) 0,1 $ONEB parallelism=tp2_sp
      pretrain gpu2_tiny_dp2 $(( lim * 3 / 10 - 10 )) 0,1 $TINY ;;
  esac
  echo "===== $step rc=$? took $(( $(date +%s) - s )) s"
  tar -C /tmp -czf "$OUT/pretrain_results.tgz" res
done
echo "total $(( $(date +%s) - t0 )) s"
