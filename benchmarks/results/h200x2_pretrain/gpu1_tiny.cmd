[gpu1_tiny] CUDA_VISIBLE_DEVICES=1 python3 examples/pretrain.py trainer.precision=bf16-mixed trainer.max_steps=200 run_dir=/tmp/runs/gpu1_tiny data.cache_dir=/tmp/runs/data_gpu1_tiny
[gpu1_tiny] rc=0 took 151 s
