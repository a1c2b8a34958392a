[gpu2_tiny_dp2] QWEN3_NEXT_MOE_EXPERTS=sequential CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc-per-node 2 examples/pretrain.py trainer.precision=bf16-mixed trainer.max_steps=200 run_dir=/tmp/runs/gpu2_tiny_dp2 data.cache_dir=/tmp/runs/data_gpu2_tiny_dp2
[gpu2_tiny_dp2] rc=124 took 196 s
