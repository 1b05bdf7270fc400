#!/usr/bin/env bash
# Every GPU measurement of the single-H200 lease, in priority order, as one background job.
#
# Staged kit (../shared/gpu/README.md) unpacked into ~/gpusite first. Start it detached so it
# outlives the device call that launched it, then collect:
#     setsid nohup bash benchmarks/gpu_suite.sh > /root/suite.out 2>&1 < /dev/null &
#     tar czf $OUT/results.tgz -C /root/results .      # in each later call
# Each stage writes <stage>.log and its JSON into $RESULTS; progress.txt says where it is.
set -u
RESULTS=${RESULTS:-/root/results}
# 2026-12-03 lease: trainer, parity, sync and the 0.6B pipeline scenarios ran; what is left runs first.
STAGES=${STAGES:-"onegpu pipeline17 trainer_nockpt trainer_4b_nockpt trainer parity sync pipeline"}
mkdir -p "$RESULTS"
export PATH=~/gpusite/bin:$PATH PYTHONPATH=~/gpusite:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
       NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OUT="$RESULTS"

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo "$(date +%T) start $name" >> "$RESULTS/progress.txt"
    timeout --kill-after=15 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$(date +%T) end $name rc=$rc" >> "$RESULTS/progress.txt"
    if [ "$rc" -ne 0 ]; then  # a killed stage can leave engines or a Ray runtime holding the GPU
        ray stop --force > /dev/null 2>&1
        pkill -9 -f "EngineCore|raylet|gcs_server|ray::" > /dev/null 2>&1
        sleep 3
    fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$RESULTS/gpu.txt" 2>&1
for s in $STAGES; do
    case $s in
    trainer)  # issue 10: verl_async trainer vs plain HF loop, gradient checkpointing on in both (~5 min)
        stage trainer 420 python3 benchmarks/trainer_throughput.py --shapes 0.6B,1.7B,4B --lengths fixed,longtail ;;
    parity)  # issue 10: bf16 trainer-vs-vLLM KL <= 1e-3; varlen kernel vs padded sdpa (~1.5 min)
        stage parity 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_logprob_parity_gpu.py \
            tests/test_train_step_gpu.py -k "parity or varlen" ;;
    sync)  # issue 11: CUDA-IPC sync cycle on one GPU, counter conservation, 0.6B/1.7B/8B (~3.5 min)
        stage sync 330 python3 benchmarks/weight_sync_gpu.py --backend ipc --shapes 0.6B,1.7B,8B --rounds 5 \
            --eager --tokens 256 --warm-s 0.3 ;;
    pipeline)  # issue 11: the pipeline on one GPU, 0.6B/1.7B, digits/long-tail, partial vs sync (~8 min)
        stage pipeline 570 python3 benchmarks/pipeline_gpu.py --steps 6 ;;
    pipeline17)  # issue 11: the 1.7B scenarios (about 3 min each with start-up)
        stage pipeline17 420 python3 benchmarks/pipeline_gpu.py --steps 6 --scenarios q17_digits_pr,q17_longtail_pr ;;
    pipeline17lt)  # issue 11: the 1.7B long-tail scenario alone (~3.5 min)
        stage pipeline17lt 330 python3 benchmarks/pipeline_gpu.py --steps 6 --scenarios q17_longtail_pr ;;
    trainer_4b_nockpt)  # issue 10: MFU at 4B without recomputation (8k-token micro-batches fit)
        stage trainer_4b_nockpt 200 python3 benchmarks/trainer_throughput.py --shapes 4B --lengths fixed,longtail \
            --checkpointing 0 --micro-batch-tokens 8192 --skip-hf --tag _4b_nockpt ;;
    onegpu)  # issue 11: every pipeline mode on one GPU, IPC conservation with many buckets, memory check (~10 min)
        stage onegpu 720 python3 -m pytest -q -s -p no:cacheprovider tests/test_one_gpu_gpu.py ;;
    trainer_nockpt)  # issue 10: both implementations without activation checkpointing where it fits (~1.5 min)
        stage trainer_nockpt 200 python3 benchmarks/trainer_throughput.py --shapes 0.6B,1.7B --lengths fixed \
            --checkpointing 0 --tag _nockpt ;;
    sync_inplace)  # issue 11: the IPC sync with in-place loading (sync.ipc_load=in_place), 8B first (~3.5 min)
        stage sync_inplace 330 python3 benchmarks/weight_sync_gpu.py --backend ipc --shapes 8B,0.6B,1.7B --rounds 5 \
            --eager --tokens 256 --warm-s 0.3 --ipc-load in_place --tag _inplace ;;
    sync_layerwise8b)  # issue 11: the same 8B sync through vLLM's layerwise reload, for the A/B (~1.5 min)
        stage sync_layerwise8b 200 python3 benchmarks/weight_sync_gpu.py --backend ipc --shapes 8B --rounds 5 \
            --eager --tokens 256 --warm-s 0.3 --ipc-load layerwise --tag _layerwise ;;
    trainer_profile)  # issue 10: 1.7B/4B fixed vs the plain loop, one extra profiled step (~3 min)
        stage trainer_profile 330 python3 benchmarks/trainer_throughput.py --shapes 1.7B,4B --lengths fixed \
            --profile --tag _profile ;;
    trainer_final)  # issue 10: trainer.compile_layers (layers and log-prob head) vs the plain loop, fixed lengths
        stage trainer_final 420 python3 benchmarks/trainer_throughput.py --shapes 1.7B,4B,0.6B --lengths fixed \
            --compile-layers 1 --tag _compiled ;;
    trainer_compile)  # issue 10: the same with trainer.compile_layers (compile time in the warm-up step)
        stage trainer_compile 360 python3 benchmarks/trainer_throughput.py --shapes 1.7B,4B --lengths fixed \
            --compile-layers 1 --skip-hf --profile --tag _compile ;;
    *) echo "unknown stage $s" >> "$RESULTS/progress.txt" ;;
    esac
done
echo "$(date +%T) DONE" >> "$RESULTS/progress.txt"
