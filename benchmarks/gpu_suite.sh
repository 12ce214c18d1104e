#!/usr/bin/env bash
# Every GPU figure in benchmarks/README.md in one device run, most important first; each stage has
# its own deadline and writes into $OUT as it goes, so a cut-off run still returns what finished.
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh      (on the GPU machine, repo root, PYTHONPATH=$PWD)
#   STAGES="throughput gpu_tests" ...               (only these stages; default: all)
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
stage() {  # stage NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    case " ${STAGES:-$name} " in *" $name "*) ;; *) return ;; esac
    local t0=$SECONDS
    timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    grep -v '^\s*$' "$OUT/$name.log" | tail -n "${TAIL:-14}"
}
stage throughput 400 python3 benchmarks/throughput.py --models qwen3-0.6b qwen2.5-0.5b \
    --serial qwen3-0.6b --unfused qwen3-0.6b --batch-invariant qwen3-0.6b --lm-head-fp32 qwen3-0.6b \
    --profile --hf-max-time 4 --hf-cb --hf-cb-max-time 25 \
    --batch1-tokens 128 --out-dir "$OUT"
stage gpu_tests ${GPU_TESTS_S:-450} python3 -m pytest -q -rfE -p no:cacheprovider tests/engine/test_weight_transfer_gpu.py \
    tests/engine/test_engine_gpu.py tests/runner/test_cuda_graph.py tests/runner/test_recompiles_gpu.py \
    tests/models/test_models_gpu.py tests/models/test_fused.py tests/engine/test_scoring_gpu.py \
    tests/runner/test_numerics_invariance_gpu.py tests/kernels tests/attention/test_attention_invariant_cuda.py \
    tests/runner/test_sampler_invariant.py tests/cluster/test_controller_gpu.py -m "gpu or not gpu"
stage weight_sync 130 python3 benchmarks/weight_sync.py --device cuda --backend ipc --shapes qwen3-0.6b qwen2.5-7b \
    --out "$OUT/weight_sync_cuda.json"
stage control 70 python3 benchmarks/control.py --device cuda --shapes qwen3-0.6b --out "$OUT/control_cuda.json"
stage serving 100 python3 benchmarks/serving.py --shape qwen2.5-0.5b --device cuda --num-prompts 512 \
    --concurrency 256 --input-len 256 --output-len 256 --block-size 256 --max-num-batched-tokens 16384 \
    --gpu-memory-utilization 0.85 --startup-timeout 60 --offline-timeout 80 --load-timeout 80 \
    --work-dir /tmp/tidal-model --out "$OUT/serving.json" --server-log "$OUT/serving_server.log"
stage throughput_7b 200 python3 benchmarks/throughput.py --models qwen2.5-7b --hf-max-time 4 --hf-cb --hf-cb-max-time 25 \
    --batch1-tokens 128 --hf-seqs 32 --out-dir "$OUT" --tag throughput_7b
