"""lm-evaluation-harness integration on a local task file (the real benchmarks need a download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'aha-attention[eval]')")

from test_eval import char_tokenizer, routed_llama

from aha.evaluation.harness import evaluate_harness

QUESTIONS = [
    {"question": "What is two plus two?", "choices": [" four", " five", " six"], "answer": 0},
    {"question": "Which colour is the sky on a clear day?", "choices": [" green", " blue"], "answer": 1},
    {"question": "How many legs has a cat?", "choices": [" four", " two"], "answer": 0},
]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """A multiple-choice task in the harness's local YAML format, reading a local JSONL file."""
    folder = tmp_path_factory.mktemp("lm-eval-task")
    data = folder / "questions.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in QUESTIONS))
    (folder / "aha_tiny_choice.yaml").write_text(
        f"""task: aha_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    (folder / "aha_tiny_generate.yaml").write_text(
        f"""task: aha_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_evaluate_harness_scores_local_tasks_with_routing_tracked(task_folder, tokenizer):
    """A log-likelihood task and a generation task (batched: left padding, routed KV-cache decoding)."""
    model = routed_llama(len(tokenizer))
    results = evaluate_harness(
        model, tokenizer, ["aha_tiny_choice", "aha_tiny_generate"], include_path=task_folder, batch_size=2, log_samples=True
    )
    assert results["results"]["aha_tiny_choice"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    answers = [sample["resps"][0][0] for sample in results["samples"]["aha_tiny_generate"]]
    assert len(answers) == 3 and all(0 < len(a) <= 8 and "\n" not in a for a in answers)
    routing = results["aha_routing"]
    assert 0.2 < routing["global_fraction"] < 0.8  # random routers: both routes were used
    assert len(routing["per_layer"]) == 2
    # the tracker is detached afterwards: later forwards are not counted
    model(input_ids=tokenizer("abc", return_tensors="pt")["input_ids"])
    assert results["aha_routing"] == routing


@pytest.mark.slow
def test_aha_lm_eval_cli_loads_a_saved_aha_model_with_routing_active(task_folder, tokenizer, tmp_path):
    """`aha lm-eval` = the lm_eval command line with aha imported; `--model aha` reports routing."""
    model = routed_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    expected = evaluate_harness(model, tokenizer, ["aha_tiny_choice"], include_path=task_folder)
    out = tmp_path / "results"
    command = [
        str(Path(sys.executable).parent / "aha"), "lm-eval",
        "--model", "aha", "--model_args", f"pretrained={tmp_path / 'model'}", "--device", "cpu",
        "--tasks", "aha_tiny_choice", "--include_path", str(task_folder), "--output_path", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AHA routing over the run" in done.stdout
    (routing,) = json.loads((out / "aha_routing.json").read_text())
    assert routing["global_fraction"] == pytest.approx(expected["aha_routing"]["global_fraction"])
    (result_file,) = out.rglob("results_*.json")
    scores = json.loads(result_file.read_text())["results"]["aha_tiny_choice"]
    assert scores["acc,none"] == pytest.approx(expected["results"]["aha_tiny_choice"]["acc,none"])
