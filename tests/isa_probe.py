"""One oneDNN ISA cap, end to end (run by tests/test_isa_matrix.py in a fresh process, with
``ONEDNN_MAX_CPU_ISA`` set and an empty CPU-tuning cache): the install-time calibration
(``aha calibrate``), then ``impl="auto"`` prefill forward + backward and a decode step in fp32, bf16
and fp16 against the dense reference. Prints one JSON line: what each dtype ran and its errors."""

import json
import sys

import torch

from aha import aha_attention, choose_impl
from aha.cli import app
from aha.kernels.cpu_tuning import kernel_choice, microkernel_name, microkernel_problem
from aha.kernels.reference import reference_attention

#: dtype -> (tolerance of the output and of the q/k/v gradients against the fp32 reference on the same
#: rounded inputs): fp32 is exact to float rounding, bf16/fp16 round the output and probabilities.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
WINDOW, SINK = 40, 1


def errors(dtype: torch.dtype, seq_q: int, seq_kv: int) -> dict[str, float]:
    """Max abs error of auto's output and gradients against the reference (GQA 4/2, mixed routes)."""
    generator = torch.Generator().manual_seed(seq_q)
    q = torch.randn(1, 4, seq_q, 64, generator=generator).to(dtype)
    k, v = (torch.randn(1, 2, seq_kv, 64, generator=generator).to(dtype) for _ in range(2))
    route = torch.rand(1, 4, seq_q, generator=generator) < 0.3
    out_grad = torch.randn(1, 4, seq_q, 64, generator=generator).to(dtype)
    assert choose_impl(q, k, route, WINDOW) == "cpp", choose_impl(q, k, route, WINDOW)
    got_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = aha_attention(*got_inputs, route, WINDOW, sink=SINK)
    got_grads = torch.autograd.grad(got, got_inputs, out_grad)
    want_inputs = [t.float().requires_grad_(True) for t in (q, k, v)]
    want = reference_attention(*want_inputs, route, WINDOW, 64**-0.5, sink=SINK)
    want_grads = torch.autograd.grad(want, want_inputs, out_grad.float())
    pairs = zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads))
    return {name: (a.float() - b).abs().max().item() for name, a, b in pairs}


def main_probe() -> int:
    status = app(["calibrate", "--dtype", "float32,bfloat16,float16", "--lengths", "64,128"], standalone_mode=False)
    if status:
        return status
    report, failed = {}, False
    for dtype, tolerance in TOLERANCES.items():
        found = {"prefill": errors(dtype, 300, 300), "decode": errors(dtype, 1, 301)}
        worst = max(error for part in found.values() for error in part.values())
        failed |= not worst <= tolerance
        report[str(dtype)] = {
            "chosen": kernel_choice(dtype).microkernel,
            "microkernels": {m: microkernel_name(dtype, m) or microkernel_problem(dtype, m) for m in ("vector", "onednn")},
            "worst_error": worst,
            "tolerance": tolerance,
            **found,
        }
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_probe())
