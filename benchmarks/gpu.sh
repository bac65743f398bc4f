#!/usr/bin/env bash
# GPU checks and benchmarks: the CUDA tests (FlexAttention prefill/training, Triton prefill and
# decode, a converted model), the Triton prefill launch sweep, and `aha bench` on the GPU shapes of
# issue 6 (prefill: flex and triton side by side). Needs a CUDA machine whose python3
# has torch, triton and transformers; runs from the repository root without installing aha.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (JSON reports and logs land in OUT_DIR)
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_triton.py 2>&1 | tee "$out/gpu-tests.log"
python3 benchmarks/triton_tune.py "$out" 2>&1 | tee "$out/triton-tune.log"
python3 - <<'PY'
import torch
from aha import aha_attention
from aha.kernels import flex
q, k, v = (torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
aha_attention(q, k, v, torch.rand(1, 8, 4096, device="cuda") < 0.07, 256)
print("flex whole-graph compile failed for:", flex._whole_graph_failed or "none")
PY
python3 -m aha.cli bench --parts prefill --impl flex,triton --dtype bfloat16 --n 4096,16384,65536 \
    --rho 0,0.07,0.1,0.3,1 --rounds 3 --out "$out" 2>&1 | tee "$out/gpu-bench-prefill.log"
python3 -m aha.cli bench --parts train,memory --dtype bfloat16 --train-n 4096,16384 --memory-n 65536 --rounds 3 \
    --out "$out" 2>&1 | tee "$out/gpu-bench-train.log"
python3 -m aha.cli bench --parts decode --dtype bfloat16 --batch 16 --decode-n 4096,16384,65536 --rounds 3 \
    --out "$out" 2>&1 | tee "$out/gpu-bench-decode.log"
