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
STAGES=${STAGES:-"trainer gputests sync pipeline trainer_extra"}
mkdir -p "$RESULTS"
export PATH=~/gpusite/bin:$PATH PYTHONPATH=~/gpusite:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
       NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OUT="$RESULTS"

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo "$(date +%T) start $name" >> "$RESULTS/progress.txt"
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    echo "$(date +%T) end $name rc=$?" >> "$RESULTS/progress.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$RESULTS/gpu.txt" 2>&1
for s in $STAGES; do
    case $s in
    trainer)  # issue 10: verl_async trainer vs plain HF loop, gradient checkpointing on in both
        stage trainer 420 python3 benchmarks/trainer_throughput.py --shapes 0.6B,1.7B,4B --lengths fixed,longtail ;;
    gputests)  # issue 10 parity (bf16 KL <= 1e-3), FSDP2 train/checkpoint, varlen vs padded kernels
        stage gputests 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_logprob_parity_gpu.py \
            tests/test_train_step_gpu.py ;;
    trainer_extra)  # issue 10: no activation checkpointing where it fits; fused norms off (what they buy)
        stage trainer_nockpt 240 python3 benchmarks/trainer_throughput.py --shapes 0.6B,1.7B --lengths fixed,longtail \
            --checkpointing 0 --tag _nockpt
        stage trainer_nofuse 120 python3 benchmarks/trainer_throughput.py --shapes 1.7B --lengths fixed \
            --fused-norms 0 --skip-hf --tag _nofuse ;;
    *) echo "unknown stage $s" >> "$RESULTS/progress.txt" ;;
    esac
done
echo "$(date +%T) DONE" >> "$RESULTS/progress.txt"
