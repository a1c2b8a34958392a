"""nemo_qwen3_next: Qwen3-Next (Gated DeltaNet + gated attention + MoE) for Megatron-Core and NeMo 2."""

from setuptools import find_packages, setup

# NeMo 2.7.3 is the last NeMo with the LLM collection; it works with megatron-core 0.15.x
# (0.16 removed optimizer/dist-ckpt APIs NeMo calls) and needs numpy<2 through modelopt.
NEMO = [
    "nemo-toolkit==2.7.3",
    "lightning>2.2.1,<=2.4.0",
    "hydra-core==1.3.2",
    "omegaconf<=2.3",
    "fiddle",
    "cloudpickle",
    "torchmetrics>=0.11.0",
    "webdataset>=0.2.86",
    "peft",
    "nv_one_logger_core>=2.3.1",
    "nv_one_logger_training_telemetry>=2.3.1",
    "nv_one_logger_pytorch_lightning_integration>=2.3.1",
    "rich",
    "sentencepiece<1.0.0",
    "pandas>=3",
    "pyarrow==22.*",
    "datasets",
    "huggingface_hub<1.0",
    "tiktoken",
    "tensorstore",
    "nemo_run",
    "leptonai==0.27.3",
    "nvidia-modelopt==0.37.0",
    "tqdm",
    "matplotlib",
    "tensorboard",
]

setup(
    name="nemo_qwen3_next",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["nemo_qwen3_next", "nemo_qwen3_next.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.7",
        "megatron-core>=0.15.3,<0.16",
        "einops",
        "numpy<2",
        "safetensors",
        "packaging",
    ],
    extras_require={
        # GPU kernels: fla ops (fla-core, or flash-linear-attention<0.6: 0.6 needs transformers 5),
        # the Dao causal-conv1d kernel (optional; fla's Triton conv is the fallback) and TE.
        # flash-qla (Qwen's fused TileLang GDN chunk kernel): measured on H200 it cut the chunk
        # kernels of one 80B-A3B GDN layer from ~3.9 to ~1.3 ms (B=4, T=4096; docs/gpu.md); used
        # when importable, fla otherwise. tilelang also serves fla's Hopper backward (triton < 3.7.1).
        "gpu": ["fla-core", "causal-conv1d", "transformer-engine[pytorch]", "flash-qla", "tilelang"],
        "nemo": NEMO,
        "test": ["pytest", "transformers~=4.57.0"],
    },
)
