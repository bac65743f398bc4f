"""Is vLLM with the AHA plugin exact on a real model? Greedy tokens and log-probabilities against ``aha``.

For each prompt length and batch size, the same prompts (Python standard-library source, which
every machine has) go through ``aha``'s own ``generate`` (the reference: routed attention, one
prompt at a time) and through ``vllm.LLM`` with the plugin (``batch`` prompts per ``generate``
call, so batch 8 runs 8 requests in the same steps). Reported per point: prompts whose greedy
tokens are equal, the first differing step otherwise (with the reference's gap between its top
two tokens there: a near-tie is rounding, a wide gap is a bug), and the largest difference of the
log-probabilities vLLM returns (its top 5 per generated token, while both agree on the tokens).
Not a timing. Run in .venv-vllm (issue 30: the demo model, 1K and 4K prompts, batch 1 and 8):

    .venv-vllm/bin/python benchmarks/vllm_exactness.py --model report/run/model --out benchmarks/results/vllm-exactness.json
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch


def _stdlib_text(characters: int) -> str:
    """Python standard-library source, the first ``characters`` of it in a fixed file order."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= characters:
            break
    return "".join(chunks)


def _prompts(tokenizer, count: int, tokens: int) -> list[list[int]]:
    ids = tokenizer(_stdlib_text(8 * tokens * (count + 1)), add_special_tokens=False).input_ids
    return [ids[997 * i : 997 * i + tokens] for i in range(count)]


@torch.no_grad()
def _reference(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, output_scores=True,
        return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [torch.log_softmax(s[0].float(), -1) for s in out.scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import aha
    from aha.report.provenance import run_meta, write_json_report

    model = aha.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    count = max(args.batches)
    prompts = {length: _prompts(tokenizer, count, length) for length in args.lengths}
    references = {length: [_reference(model, p, args.new_tokens) for p in prompts[length]] for length in args.lengths}
    llm = LLM(
        model=str(args.model), dtype="float32", max_model_len=max(args.lengths) + args.new_tokens + 32,
        max_num_seqs=count, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
        kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
    )  # fmt: skip
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True, logprobs=5)
    points = []
    for length in args.lengths:
        for batch in args.batches:
            outputs = []
            for first in range(0, count, batch):
                outputs += llm.generate([{"prompt_token_ids": p} for p in prompts[length][first : first + batch]], params, use_tqdm=False)
            equal, max_error, divergences = 0, 0.0, []
            for output, (tokens, logprobs) in zip(outputs, references[length]):
                got = list(output.outputs[0].token_ids)
                same = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), len(tokens))
                equal += same == len(tokens)
                if same < len(tokens):
                    top2 = logprobs[same].topk(2).values
                    divergences.append({"step": same, "reference_top2_gap": (top2[0] - top2[1]).item()})
                for step in range(same):
                    for token, logprob in output.outputs[0].logprobs[step].items():
                        max_error = max(max_error, abs(logprob.logprob - logprobs[step][token].item()))
            points.append({
                "prompt_tokens": length, "batch": batch, "prompts": len(outputs), "greedy_equal": equal,
                "max_logprob_abs_diff": max_error, "divergences": divergences,
            })  # fmt: skip
            print(points[-1])
    import vllm

    report = {
        "meta": {
            **run_meta(),
            "what": "vLLM + AHA plugin vs aha's generate: greedy tokens and top-5 log-probabilities (fp32)",
            "vllm": vllm.__version__,
            "model": str(args.model.resolve()),
            "new_tokens": args.new_tokens,
            "compiled": not args.enforce_eager,
            "aha": model.config.aha,
        },
        "points": points,
    }
    write_json_report(args.out, report)


if __name__ == "__main__":
    main()
