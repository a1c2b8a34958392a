#!/usr/bin/env bash
# One device call: unpack the carried wheels, then run the named steps, each under its own time limit.
# Usage (device, repo root): bash benchmarks/device_run.sh STEP[:SECONDS] ...
# Steps: tests, bench, profile, ladder, modules, gen_tests, decode, cache.  Logs and results go to $OUT.
# Carry: .devwheels/bundle (site/ + site-anchor/ as one tar.xz, see docs/gpu.md), .devwheels/fq
# (the flash-qla wheel) and, when a previous call saved one, .devwheels/cache (tlcache.tgz: TileLang kernels
# and Triton autotune results, rebuilt from the cache step's tlcache.tgz.* parts).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ ! -d /tmp/site/fla ]; then
  tar -C /tmp -xJf .devwheels/bundle/bundle.tar.xz || exit 1
  for w in .devwheels/fq/*.whl; do python3 -m zipfile -e "$w" /tmp/site/ || exit 1; done
fi
echo "unpacked in $(( $(date +%s) - t0 )) s"
# TileLang kernels and Triton autotune picks saved by an earlier call (cache step), if carried
[ -f .devwheels/cache/tlcache.tgz ] && tar -xzf .devwheels/cache/tlcache.tgz && echo "restored .tlcache"
mkdir -p .tlcache/tl .tlcache/triton
export PYTHONPATH=/tmp/site:$PWD TILELANG_CACHE_DIR=$PWD/.tlcache/tl TRITON_CACHE_DIR=$PWD/.tlcache/triton
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, fla, tilelang, flash_qla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'tilelang', tilelang.__version__, 'flash_qla', flash_qla.__version__)"
for item in "$@"; do
  step=${item%%:*}; lim=${item#*:}; [ "$lim" = "$item" ] && lim=300
  s=$(date +%s); echo "===== $step (limit $lim s)"
  case $step in
    tests) timeout -k 5 "$lim" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_gdn.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    bench) timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls ours,hf,ours-fla,mcore \
             --shapes 1x32768,4x4096 --rep 10 --mcore-timeout "${MCORE_TIMEOUT:-200}" \
             --out "$OUT/h200_gdn_acceptance.json" --visualize 2>&1 | tee "$OUT/bench.log" ;;
    ladder) timeout -k 5 "$lim" python3 examples/benchmark.py --modules gdn --impls ours,hf \
             --shapes 1x4096,1x8192,1x16384,1x65536 --rep 5 --out "$OUT/h200_gdn_ladder.json" 2>&1 | tee "$OUT/ladder.log" ;;
    modules) timeout -k 5 "$lim" python3 examples/benchmark.py --modules attn,moe,layer --impls ours \
             --shapes 1x4096,4x4096,1x16384 --rep 5 --out "$OUT/h200_modules.json" 2>&1 | tee "$OUT/modules.log" ;;
    profile) timeout -k 5 "$lim" python3 benchmarks/profile_gdn.py --shape 4x4096 --variants flash_qla,fla,fla-cat \
             2>&1 | tee "$OUT/profile.log" ;;
    gen_tests) timeout -k 5 "$lim" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_generate.py 2>&1 \
             | tee "$OUT/gpu_generate_tests.log" ;;
    decode) timeout -k 5 "$lim" python3 examples/bench_decode.py --decode-out "$OUT/h200_decode.json" --visualize \
             2>&1 | tee "$OUT/decode.log" ;;
    cache) tar -C . -czf /tmp/tlcache.tgz .tlcache && ls -la /tmp/tlcache.tgz && split -b 15m -d /tmp/tlcache.tgz "$OUT/tlcache.tgz." ;;
  esac
  echo "===== $step rc=${PIPESTATUS[0]} took $(( $(date +%s) - s )) s"
done
echo "total $(( $(date +%s) - t0 )) s"
