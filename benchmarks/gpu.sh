#!/usr/bin/env bash
# GPU checks and benchmarks for issue 6, in priority order (stages):
#   tests    the CUDA tests: FlexAttention prefill/training, the Triton prefill and decode kernels, a converted model
#   prefill  whether flex's whole-graph compile works, then `aha bench` prefill with flex and triton side by side
#   tune     the Triton prefill launch-configuration sweep (benchmarks/triton_tune.py)
#   train    `aha bench` forward+backward (flex and triton) and peak memory
#   decode   `aha bench` decode step at batch 16
# Needs a CUDA machine whose python3 has torch, triton and transformers; runs from the repository
# root without installing aha.
# Usage: benchmarks/gpu.sh [OUT_DIR] [STAGES]   e.g. benchmarks/gpu.sh /tmp/gpu prefill,tune
#        (JSON reports and logs land in OUT_DIR; STAGES defaults to all five)
set -u
out=${1:-benchmarks/results}
stages=${2:-tests,prefill,tune,train,decode}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
wanted() { [[ ",$stages," == *",$1,"* ]]; }

python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if wanted tests; then
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton.py tests/test_triton_properties.py 2>&1 | tee "$out/gpu-tests.log"
fi
if wanted prefill; then
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
fi
if wanted tune; then
    python3 benchmarks/triton_tune.py "$out" 2>&1 | tee "$out/triton-tune.log"
fi
if wanted train; then
    python3 -m aha.cli bench --parts train,memory --impl flex,triton --dtype bfloat16 --train-n 4096,16384 \
        --memory-n 65536 --rounds 3 --out "$out" 2>&1 | tee "$out/gpu-bench-train.log"
fi
if wanted decode; then
    python3 -m aha.cli bench --parts decode --dtype bfloat16 --batch 16 --decode-n 4096,16384,65536 --rounds 3 \
        --out "$out" 2>&1 | tee "$out/gpu-bench-decode.log"
fi
