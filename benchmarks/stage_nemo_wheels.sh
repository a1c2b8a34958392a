#!/usr/bin/env bash
# Recreate .devwheels/nemo/ from scratch: the Python 3.12 x86_64 wheels that, installed with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nemosite .devwheels/nemo/*.whl
# on the offline GPU machine, let
#   PYTHONPATH=/tmp/nemosite:/tmp/site:$PWD python3 examples/pretrain.py ...
# run NeMo 2.7.3 pretraining there. /tmp/site (megatron-core 0.15.3, hydra-core, omegaconf, antlr4,
# fla-core, tilelang) comes from another carry (.devwheels/b, .devwheels/bundle) and is not repeated here.
# The machine already has torch 2.11, numpy 2.5, pandas, pyarrow, scipy, scikit-learn, tensorboard,
# tensorstore, rich, typer, httpx, anyio, pytorch-lightning 2.6.6, accelerate, peft, ... : none of those here.
# The folder travels in a 64 MiB carry, so its total must stay <= 58 MiB (checked at the end).
# Usage (this machine, repo root): bash benchmarks/stage_nemo_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
D=.devwheels/nemo
rm -rf "$D"; mkdir -p "$D"

dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$D" "$@"
}

# 1. On the machine, but at versions NeMo 2.7.3 cannot use; these shadow them from /tmp/nemosite:
#    transformers 5.x -> 4.57.6 (what NeMo 2.7.3 is built against); transformers 4.57 refuses
#    huggingface_hub >= 1.0 and requires 0.22 <= tokenizers <= 0.23.0 at import; NeMo refuses lightning 2.6.
dl nemo-toolkit==2.7.3 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 lightning==2.4.0

# 2. Unconditional imports of NeMo's core (nemo.lightning, nemo.utils, nemo.core):
#    fiddle (+ libcst, graphviz: fiddle imports both; libcst 1.0.1 has no cp312 wheel, so 1.9.0),
#    nv-one-logger-* (nemo.lightning.one_logger_callback) with its deps pydantic(+core, annotated-types,
#    typing-inspection), StrEnum, overrides, toml; webdataset + braceexpand (nemo.utils).
#    pydantic may already be on the machine; this pinned pair (pydantic 2.13.4 / pydantic_core 2.46.4)
#    is consistent on its own.
dl fiddle==0.3.1 libcst==1.9.0 graphviz==0.21 \
   nv-one-logger-core==2.3.1 nv-one-logger-training-telemetry==2.3.1 nv-one-logger-pytorch-lightning-integration==2.3.1 \
   pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
   StrEnum==0.4.15 overrides==7.7.0 toml==0.10.2 webdataset==1.0.2 braceexpand==0.1.7

# 3. `from nemo.collections import llm` imports nemo.collections.llm.bert.data.specter, which does
#    `from datasets import ...` at module level: datasets + its dill / multiprocess pins.
dl datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19

# 4. nemo.collections.llm.gpt.data.api does `import nemo_run` at module level (not optional), and
#    nemo_run imports its whole executor tree at import: fabric/paramiko (ssh tunnel: cryptography,
#    bcrypt, PyNaCl, cffi, invoke, decorator), torchx (docstring_parser, importlib_metadata + its
#    lazy-importer), catalogue, and leptonai (LeptonExecutor) with fastapi (which imports
#    opentelemetry-api), starlette, uvicorn, loguru, python-multipart, contextlib2,
#    prometheus-fastapi-instrumentator, exceptiongroup, ledoc-ui. pycparser is cffi's declared dep.
dl nemo_run==0.11.1 catalogue==2.0.10 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
   fabric==3.2.3 invoke==2.2.1 decorator==5.2.1 paramiko==5.1.0 cryptography==48.0.0 bcrypt==5.0.0 \
   PyNaCl==1.6.2 cffi==2.0.0 pycparser==3.0 torchx==0.7.0 docstring_parser==0.18.0 \
   leptonai==0.27.3 loguru==0.7.3 fastapi==0.163.2 starlette==0.52.1 opentelemetry-api==1.45.2 \
   python-multipart==0.0.34 contextlib2==21.6.0 prometheus-fastapi-instrumentator==7.0.0 \
   uvicorn==0.54.0 exceptiongroup==1.3.1 ledoc-ui==0.1.0

# 5. llm.train lives in nemo.collections.llm.api, which imports nemo.collections.llm.modelopt and so
#    nvidia-modelopt (without it NeMo only warns and `llm.train` is missing). modelopt imports
#    torchprofile, pynvml (nvidia-ml-py) and `import pulp` at module level. PuLP 3.x is 15.6 MB (it bundles
#    CBC binaries for every OS); PuLP 4.2.0 is a 0.7 MB cp312 wheel, and modelopt only uses pulp in its NAS
#    search, never in pretraining. PuLP 4 imports orloge, which imports cpsat-logutils.
dl nvidia-modelopt==0.37.0 torchprofile==0.1.0 nvidia-ml-py==13.615.71 pulp==4.2.0 orloge==1.0.0 cpsat-logutils==1.0.0

# 6. sdist-only, pure Python: wget (nemo.core.classes.common -> nemo.utils.cloud imports it).
python3 -m pip wheel -q --no-deps -w "$D" wget==3.2

# Left out on purpose: boto3/botocore/s3transfer/jmespath (tensorboard's optional S3 file system, imported
# in try/except; botocore alone is 14 MB), opentelemetry-sdk & co. (transformers' optional metrics), h2/trio
# (httpcore's optional backends), orjson, numexpr, cuda-bindings (torch 2.11 on the machine depends on it),
# zarr (absent here too; NeMo only warns).

ls -l "$D"
bytes=$(du -cb "$D"/*.whl | tail -1 | cut -f1)
echo "$(ls "$D"/*.whl | wc -l) wheels, $(python3 -c "print(f'{$bytes/2**20:.2f}')") MiB"
[ "$bytes" -le $((58 * 1024 * 1024)) ] || { echo "over the 58 MiB limit" >&2; exit 1; }
