#!/usr/bin/env bash
# One device call for the whole-model speed work (issue 10): run the named steps, each under its limit.
# Usage (device, repo root, after the stage-a install call of ../shared/device/README.md):
#   bash benchmarks/device_model.sh [install] STEP[:SECONDS] ...      (carry .devwheels/b for install)
# Steps: tests (GPU numerics of the speed paths; GPU_TESTS = other test files), bgtests + wait (the same in the background), warm (compile for gdn/model, untimed), gdnwarm (compile for the gdn step: a process per shape + the mcore child, with bgtests), model (ours with lever variants + HF, B=2/1 T=4096,
# breakdown, profile), second (a new process on the warm machine: time to its first step), gdn (our GDN layer
# at the acceptance shapes, eager and CUDA-graphed; GDN_IMPLS, GDN_SHAPES), nemo (examples/pretrain.py on the same model, data=mock, NEMO_STEPS steps), wave (GPU tests + the model
# benchmark with every compile at once, then timed alone), importtime (the second-process command under -X importtime, twice), decode (examples/bench_decode.py; DECODE_ARGS), conv (benchmarks/bench_conv.py), inproj (benchmarks/bench_in_proj.py), profile (benchmarks/profile_gdn.py per kernel), cache (the kernel cache into $OUT, xz in 15 MiB parts). Logs and JSON go to $OUT.
set -u
# The device returns at most 8 files: steps write to a work folder; at the end the JSON and PNGs are copied
# to $OUT, everything else (logs, profiles, metrics) goes into $OUT/logs.tgz, the kernel cache (step cache) into $OUT/kcache.tar.xz.
FINAL=${OUT:-/tmp/out}; mkdir -p "$FINAL"
OUT=/tmp/device_model_work; rm -rf "$OUT"; mkdir -p "$OUT"
finish() { cp "$OUT"/*.json "$OUT"/*.png "$FINAL"/ 2>/dev/null; mv "$OUT"/kcache.tar.xz "$FINAL"/ 2>/dev/null
           (cd "$OUT" && tar -czf "$FINAL/logs.tgz" --exclude='*.png' --exclude='kcache.tar.xz' .); ls -la "$FINAL"; }
trap finish EXIT
trap 'exit 143' TERM INT
export PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ "${1:-}" = install ]; then
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/b/*.whl || exit 1
fi
# z3 (tilelang's solver, 29 MB) may live in .devwheels/z3, carried in a call of its own: b + anchor + the kernel
# cache + z3 pass the 64 MiB carry limit
[ -d /tmp/site/z3 ] || ! ls .devwheels/z3/*.whl >/dev/null 2>&1 || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/z3/*.whl
if [ "${1:-}" = install_anchor ]; then  # carry .devwheels/anchor: megatron-core 0.19.2 for --impls mcore
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-anchor .devwheels/anchor/*.whl || exit 1
fi
if [ "${1:-}" = install_nemo ]; then  # carry .devwheels/nemo (benchmarks/stage_nemo_wheels.sh)
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nemosite .devwheels/nemo/*.whl || exit 1
fi
[ -f .devwheels/cache/kcache.tgz ] && tar -xzf .devwheels/cache/kcache.tgz && echo "restored .kcache"
[ -f .devwheels/cache/kcache.tar.xz ] && tar -xJf .devwheels/cache/kcache.tar.xz && echo "restored .kcache (xz)"
ls .devwheels/cache/kcache.tar.xz.part* >/dev/null 2>&1 && cat .devwheels/cache/kcache.tar.xz.part* | tar -xJf - && echo "restored .kcache (xz parts)"
mkdir -p .kcache/tl .kcache/triton
export PYTHONPATH=/tmp/site:$PWD TILELANG_CACHE_DIR=${TILELANG_CACHE_DIR:-$PWD/.kcache/tl} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.kcache/triton}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, fla, tilelang, flash_qla, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'tilelang', tilelang.__version__, 'flash_qla', flash_qla.__version__, 'transformers', transformers.__version__)"
# the GPU tests under a time limit ($1), into their log with the exit code appended (bgtests, wave)
# GPU_TESTS_SPLIT=1: one pytest process per GPU_TESTS word (a file: per test function), all at once (their TileLang compiles are CPU work and
# ran one after another in one process: the Dec 07 call spent 510 s in tests/test_gpu_gdn.py and did not finish)
gpu_tests_logged() { local log="$OUT/${GPU_TESTS_LOG:-gpu_tests.log}" i=0 t
  if [ "${GPU_TESTS_SPLIT:-0}" = 1 ]; then
    # a word naming a whole file becomes one word per test function (Dec 08: tests/test_gpu_speed_paths.py as one
    # process spent its 300 s compiling the conv cases and never reached the norm case)
    for t in $(for w in ${GPU_TESTS:-tests/test_gpu_speed_paths.py}; do case $w in *::*) echo "$w" ;;
                 *) fns=$(grep -o '^def test_[A-Za-z0-9_]*' "$w" | sed "s|^def |$w::|"); echo "${fns:-$w}" ;; esac; done); do i=$((i + 1))
      ( timeout -k 5 "$1" python3 -m pytest -q -s -p no:cacheprovider "$t" > "$log.$i" 2>&1; echo "pytest $t rc=$?" >> "$log.$i" ) &
    done; wait
    for t in $(seq 1 "$i"); do cat "$log.$t"; rm -f "$log.$t"; done > "$log"
    grep "^pytest .* rc=" "$log"; return
  fi
  timeout -k 5 "$1" python3 -m pytest -q -s -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu_speed_paths.py} > "$log" 2>&1
  echo "pytest rc=$?" >> "$log"; }
for item in "$@"; do
  step=${item%%:*}; lim=${item#*:}; [ "$lim" = "$item" ] && lim=300
  s=$(date +%s); echo "===== $step (limit $lim s)"
  case $step in
    tests) timeout -k 5 "$lim" python3 -m pytest -q -s -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu_speed_paths.py} 2>&1 | tee "$OUT/${GPU_TESTS_LOG:-gpu_speed_tests.log}" ;;
    bgtests) # the GPU tests in the background (their compiles overlap the next steps'); `wait` collects them
          gpu_tests_logged "$lim" & ;;
    warm) # compile what the timed gdn/model steps need, beside bgtests (all CPU work, nothing timed); then wait
          ( timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls "${GDN_IMPLS:-ours,ours-graphs}" \
              --shapes "${GDN_SHAPES:-1x4096,4x4096,1x32768}" --anchor-path /tmp/site-anchor --mcore-timeout "$lim" \
              --rep 1 --warmup 1 ${GDN_EXTRA:-} --out /tmp/warm_gdn.json > "$OUT/warm_gdn.log" 2>&1 ) &
          ( timeout -k 5 "$lim" python3 examples/benchmark.py --modules model --model-impls ours --shapes "${MODEL_SHAPES:-2x4096}" \
              --variants "${MODEL_VARIANTS:-fast}" --rep 1 --warmup 1 --no-breakdown --out /tmp/warm_model.json > "$OUT/warm_model.log" 2>&1 ) &
          wait; tail -n 2 "$OUT"/warm_*.log "$OUT/${GPU_TESTS_LOG:-gpu_tests.log}" ;;
    gdnwarm) # compile everything the timed gdn step needs, one process per shape plus the mcore child and
          # bgtests' GPU tests, all at once (compiles are CPU work); nothing here is timed
          # (the mcore child only where GDN_IMPLS names mcore)
          impls=$(echo ",${GDN_IMPLS:-ours,ours-graphs}," | sed 's/,mcore,/,/; s/^,//; s/,$//')
          for shp in $(echo "${GDN_SHAPES:-1x4096,4x4096,1x32768}" | tr , ' '); do
            ( timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls "$impls" \
                --shapes "$shp" --rep 1 --warmup 1 --out "/tmp/warm_gdn_$shp.json" > "$OUT/warm_gdn_$shp.log" 2>&1 ) &
          done
          case ",${GDN_IMPLS:-}," in *,mcore,*)
          ( timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls mcore --shapes "${GDN_SHAPES:-1x4096,4x4096,1x32768}" \
              --anchor-path /tmp/site-anchor --mcore-timeout "$lim" --rep 1 --warmup 1 --out /tmp/warm_mcore.json \
              > "$OUT/warm_mcore.log" 2>&1 ) & ;; esac
          wait; tail -n 3 "$OUT"/warm_*.log "$OUT/${GPU_TESTS_LOG:-gpu_tests.log}" ;;
    wait) wait; tail -3 "$OUT/${GPU_TESTS_LOG:-gpu_tests.log}" ;;
    model) timeout -k 5 "$lim" python3 examples/benchmark.py --modules model --model-impls "${MODEL_IMPLS:-hf,ours}" --shapes "${MODEL_SHAPES:-2x4096,1x4096}" \
             --variants "${MODEL_VARIANTS:-base,no_fused_ce,no_fast_permute,all_off}" --rep "${MODEL_REP:-10}" \
             --hf-timeout "${HF_TIMEOUT:-240}" --profile "$OUT/h200_model_profile" --out "$OUT/h200_model.json" --visualize 2>&1 | tee "$OUT/model.log" ;;
    second) timeout -k 5 "$lim" python3 examples/benchmark.py --modules model --model-impls ours --shapes 1x4096 \
             --rep 3 --no-breakdown --out "$OUT/h200_model_second_process.json" 2>&1 | tee "$OUT/second.log" ;;
    gdn) timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls "${GDN_IMPLS:-ours,ours-graphs}" --shapes "${GDN_SHAPES:-1x4096,4x4096,1x32768}" \
             --anchor-path /tmp/site-anchor --mcore-timeout "${MCORE_TIMEOUT:-420}" --rep 10 --visualize ${GDN_EXTRA:-} --out "$OUT/h200_gdn_now.json" 2>&1 | tee "$OUT/gdn.log" ;;
    nemo) PYTHONPATH=/tmp/nemosite:$PYTHONPATH timeout -k 10 "$lim" python3 examples/pretrain.py model=qwen3_next_reduced \
             data=mock trainer.precision=bf16-mixed trainer.max_steps=${NEMO_STEPS:-40} trainer.val_check_interval=1000 \
             checkpoint.every_n_steps=1000 checkpoint.save_optim_on_train_end=false run_dir=/tmp/runs/nemo_reduced ${NEMO_EXTRA:-} \
             2>&1 | tee "$OUT/nemo_reduced.log"; cp /tmp/runs/nemo_reduced/metrics/metrics.jsonl "$OUT/nemo_reduced.metrics.jsonl" 2>/dev/null
          cp -r /tmp/runs/nemo_reduced/profile "$OUT/nemo_profile" 2>/dev/null; cp "$OUT"/nemo_profile/gaps_*.json "$OUT"/ 2>/dev/null ;;
    importtime) # the second-process command under -X importtime (run twice: the first writes the .pyc files)
          for i in 1 2; do timeout -k 5 "$lim" python3 -X importtime examples/benchmark.py --modules model --model-impls ours \
              --shapes 1x4096 --variants "${MODEL_VARIANTS:-fast}" --rep 3 --no-breakdown --out "$OUT/h200_model_second_process_$i.json" \
              > "$OUT/importtime_$i.log" 2> "$OUT/importtime_$i.txt"; grep -v "^import time" "$OUT/importtime_$i.txt" | tail -3
            grep "^model" "$OUT/importtime_$i.log"; sort -t'|' -k2 -n "$OUT/importtime_$i.txt" | tail -30 | cut -c1-140; done ;;
    wave) # everything compiles at once (GPU tests, HF child, ours at B=1 in a side process, ours at B=2), then
          # ours and HF are timed alone on a quiet GPU (bench_model --hf-concurrent --prewarm --wait-file)
          rm -f /tmp/tests.done /tmp/warm_b1.done
          ( gpu_tests_logged "$((lim - 60))"; touch /tmp/tests.done ) &
          ( timeout -k 5 "$((lim - 60))" python3 examples/benchmark.py --modules model --model-impls ours --shapes 1x4096 --variants base \
              --rep 1 --no-breakdown --out /tmp/warm_b1.json > /tmp/warm_b1.log 2>&1; touch /tmp/warm_b1.done ) &
          timeout -k 5 "$lim" python3 examples/benchmark.py --modules model --model-impls ours,hf --hf-concurrent --prewarm \
             --wait-file /tmp/tests.done,/tmp/warm_b1.done --shapes "${MODEL_SHAPES:-2x4096,1x4096}" \
             --variants "${MODEL_VARIANTS:-base,graphs,stacked,fast,megatron_step}" --rep "${MODEL_REP:-10}" --hf-timeout "${HF_TIMEOUT:-420}" \
             --profile "$OUT/h200_model_profile" --out "$OUT/h200_model.json" --visualize 2>&1 | tee "$OUT/model.log"
          wait ;;
    decode) timeout -k 5 "$lim" python3 examples/bench_decode.py --decode-out "$OUT/h200_decode.json" --visualize ${DECODE_ARGS:-} \
             2>&1 | tee "$OUT/decode.log" ;;
    conv) # our conv per launch config vs bytes moved, and fla's conv + FlashQLA's L2-norm (CONV_CONFIGS)
          timeout -k 5 "$lim" python3 benchmarks/bench_conv.py --shapes "${CONV_SHAPES:-4x4096,1x32768,1x4096}" \
             ${CONV_CONFIGS:+--configs "$CONV_CONFIGS"} --out "$OUT/conv_configs.json" 2>&1 | tee "$OUT/conv.log" ;;
    inproj) # in_proj as five planar GEMMs vs one (benchmarks/bench_in_proj.py)
          timeout -k 5 "$lim" python3 benchmarks/bench_in_proj.py --tokens "${INPROJ_TOKENS:-4096,16384,32768}" \
             --out "$OUT/in_proj.json" 2>&1 | tee "$OUT/in_proj.log" ;;
    cache) # xz, split into 15 MiB parts (a returned file is at most 16 MiB); put them at .devwheels/cache/
          du -sh .kcache/*; tar -cf - .kcache | xz -T0 -6 | split -b 15M -d - "$FINAL/kcache.tar.xz.part" && ls -la "$FINAL"/kcache* ;;
    profile) # where the GDN layer's fwd+bwd time goes, per CUDA kernel (PROFILE_SHAPES, PROFILE_VARIANTS)
          for shp in $(echo "${PROFILE_SHAPES:-4x4096,1x32768}" | tr , ' '); do
            timeout -k 5 "$lim" python3 benchmarks/profile_gdn.py --shape "$shp" --variants "${PROFILE_VARIANTS:-flash_qla-triton}" --top 40 \
              2>&1 | grep -v "TileLang begins\|TileLang completes" | tee -a "$OUT/gdn_profile.log"; done ;;
  esac
  echo "===== $step rc=${PIPESTATUS[0]} took $(( $(date +%s) - s )) s"
done
echo "total $(( $(date +%s) - t0 )) s"
