#!/bin/bash
# Issue 24's GPU checks as one command for the GPU machine (the `device` tool: Python 3.12, torch with CUDA,
# no Ray, faiss, webdataset or img2dataset). Prepare the carried files here with `make device-carry`, then
# run from the repository root there, carrying .device:
#   bash bench/device_checks.sh            (writes its JSON under $OUT)
# - bench.embed_throughput: the model alone, fp16 autocast, batches of 64 / 256 / 1,024;
# - bench.decode_fanout: the model fed by 1..15 decode processes of real shards (the decode tasks' own
#   code), with the streams the embedding actors' rule (indexing/embed/fanout.py) keeps from the costs.
# About 4 minutes on an H100 / H200. DEVICE, STREAMS and SECONDS change the runs (a CPU try here:
#   PYTHON=.venv/bin/python DEVICE=cpu STREAMS="1 2" SECONDS_EACH=2 OUT=/tmp/out bash bench/device_checks.sh).
set -euo pipefail
OUT=${OUT:-/tmp/copyscan-device-out}
DEVICE=${DEVICE:-cuda}
STREAMS=${STREAMS:-1 2 4 8 12 15}
SECONDS_EACH=${SECONDS_EACH:-15}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
"$PYTHON" -m bench.embed_throughput --device "$DEVICE" --batch 64 256 1024 --seconds 5 \
    --weights effnet-lite0=.device/effnet.pth --decode .device/shards/00000.tar > "$OUT/embed_throughput.json"
# shellcheck disable=SC2086  # STREAMS is a list
"$PYTHON" -m bench.decode_fanout --device "$DEVICE" --weights .device/effnet.pth --shards .device/shards \
    --streams $STREAMS --batch 256 --seconds "$SECONDS_EACH" --warmup 5 > "$OUT/decode_fanout.json"
cat "$OUT/decode_fanout.json"
