#!/usr/bin/env bash
# 1P1D on one node with two GPUs: prefill on GPU 0, decode on GPU 1, SplitZip over NIXL/UCX (cuda_ipc / rc).
# Runs the same checks as the CPU E2E test (token equality with a single-server run, KV received, wire bytes).
# Needs a CUDA build of vLLM and `pip install --no-build-isolation .` of splitzip-vllm (CUDA codec built).
#   MODEL=/path/to/model bash examples/gpu_1p1d_single_node.sh
set -euo pipefail
ngpu=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$ngpu" -lt 2 ]; then
  echo "SKIP: this recipe needs 2 GPUs, found $ngpu (prefill uses GPU 0, decode GPU 1)"; exit 0
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${MODEL:-$HERE/../out/tiny-llama}"
[ -d "$MODEL" ] || python "$HERE/../scripts/make_tiny_model.py" "$MODEL"
LOGS="${LOGS:-$HERE/../out/gpu-1p1d}"; mkdir -p "$LOGS"
KV='{"kv_connector":"SplitZipConnector","kv_connector_module_path":"splitzip_vllm.connector"'
COMMON=(--model "$MODEL" --served-model-name tiny --dtype bfloat16 --max-model-len 4096 --enforce-eager
        --block-size 16 --gpu-memory-utilization 0.3)
export HF_HUB_OFFLINE=1 UCX_NET_DEVICES=all
CUDA_VISIBLE_DEVICES=0 VLLM_NIXL_SIDE_CHANNEL_PORT=5600 python -m vllm.entrypoints.openai.api_server "${COMMON[@]}" \
  --port 8100 --kv-transfer-config "$KV,\"kv_role\":\"kv_producer\",\"kv_connector_extra_config\":{\"compression\":\"always\"}}" \
  > "$LOGS/prefill.log" 2>&1 & P=$!
CUDA_VISIBLE_DEVICES=1 VLLM_NIXL_SIDE_CHANNEL_PORT=5601 python -m vllm.entrypoints.openai.api_server "${COMMON[@]}" \
  --port 8200 --kv-transfer-config "$KV,\"kv_role\":\"kv_consumer\",\"kv_load_failure_policy\":\"recompute\"}" \
  > "$LOGS/decode.log" 2>&1 & D=$!
python "$HERE/proxy.py" --port 8000 --prefiller-ports 8100 --decoder-ports 8200 > "$LOGS/proxy.log" 2>&1 & X=$!
trap 'kill $P $D $X 2>/dev/null || true' EXIT
for port in 8100 8200; do
  for _ in $(seq 600); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 1; done
done
python "$HERE/check_pd.py" --proxy http://127.0.0.1:8000 --reference http://127.0.0.1:8100 --decode http://127.0.0.1:8200
