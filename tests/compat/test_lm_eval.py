"""lm-evaluation-harness (`lm_eval`, the CLI as a user runs it) against `tidal serve`: its
`local-completions` model on generate_until and loglikelihood tasks, and `local-chat-completions`,
on a tiny dataset the test writes. The targets come from Tidal's own greedy answers (generation) and
from HF transformers' scores (loglikelihood), so every metric is 1.0 only if lm-eval sent what it
meant to and parsed what Tidal returned."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.compat.conftest import require_module

pytestmark = [pytest.mark.thirdparty, pytest.mark.timeout(900)]

QUESTIONS = ["Q: 1+1=", "Q: the sky is", "Tidal"]
CHOICES = ["2", "3", "eleven"]
DELIM = " "  # lm-eval scores target_delimiter + choice after the context
GEN = {"until": ["\n"], "max_gen_toks": 8}


def model_name(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def write_task(tmp_path, name: str, output_type: str, rows: list[dict]) -> None:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
             "test_split: test", f"output_type: {output_type}", 'doc_to_text: "{{question}}"']
    if output_type == "multiple_choice":
        lines += ['doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"', f'target_delimiter: "{DELIM}"',
                  "metric_list:", "  - metric: acc"]
    else:
        lines += ['doc_to_target: "{{target}}"', "generation_kwargs:", '  until: ["\\n"]',
                  f"  max_gen_toks: {GEN['max_gen_toks']}", "  do_sample: false", "metric_list:",
                  "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true"]
    (tmp_path / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def run_lm_eval(tmp_path, model: str, model_args: dict, tasks: str, *extra: str) -> tuple[dict, list[dict]]:
    """`python -m lm_eval ...`; returns (results, samples) from its output files."""
    out = tmp_path / f"out-{model}"
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--include_path", str(tmp_path),
           "--tasks", tasks, "--output_path", str(out), "--log_samples", *extra]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"lm_eval exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    samples = [json.loads(line) for f in glob.glob(str(out / "*" / "samples_*.jsonl")) for line in open(f)]
    return json.load(open(results))["results"], sorted(samples, key=lambda s: s["doc_id"])


def greedy(server, route: str, body: dict) -> str:
    body = {**body, "temperature": 0, "max_tokens": GEN["max_gen_toks"], "stop": GEN["until"]}
    r = httpx.post(server.url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_local_completions_generate_until(compat_server, compat_model, tmp_path):
    require_module("lm_eval", "lm-eval[api]")
    name = model_name(compat_server)
    rows = [{"question": q, "target": greedy(compat_server, "/v1/completions", {"model": name, "prompt": q})}
            for q in QUESTIONS]
    write_task(tmp_path, "tidal_gen", "generate_until", rows)
    args = {"model": name, "base_url": compat_server.url + "/v1/completions", "tokenizer": compat_model,
            "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1}
    results, samples = run_lm_eval(tmp_path, "local-completions", args, "tidal_gen")
    assert [s["resps"][0][0] for s in samples] == [r["target"] for r in rows]
    assert results["tidal_gen"]["exact_match,none"] == 1.0


def test_local_chat_completions_generate_until(compat_server, tmp_path):
    require_module("lm_eval", "lm-eval[api]")
    name = model_name(compat_server)
    rows = [{"question": q, "target": greedy(compat_server, "/v1/chat/completions",
                                             {"model": name, "messages": [{"role": "user", "content": q}]})}
            for q in QUESTIONS]
    write_task(tmp_path, "tidal_chat", "generate_until", rows)
    args = {"model": name, "base_url": compat_server.url + "/v1/chat/completions", "num_concurrent": 1,
            "max_retries": 1}
    results, samples = run_lm_eval(tmp_path, "local-chat-completions", args, "tidal_chat", "--apply_chat_template")
    assert [s["resps"][0][0] for s in samples] == [r["target"] for r in rows]
    assert results["tidal_chat"]["exact_match,none"] == 1.0


def hf_loglikelihoods(model_dir: str, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | context) from HF transformers in fp32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].float()
        logp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
        out.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
    return out


def test_local_completions_loglikelihood(compat_server, compat_model, tmp_path):
    require_module("lm_eval", "lm-eval[api]")
    scores = [hf_loglikelihoods(compat_model, q, [DELIM + c for c in CHOICES]) for q in QUESTIONS]
    rows = [{"question": q, "choices": CHOICES, "answer": max(range(len(CHOICES)), key=s.__getitem__)}
            for q, s in zip(QUESTIONS, scores)]
    write_task(tmp_path, "tidal_ll", "multiple_choice", rows)
    args = {"model": model_name(compat_server), "base_url": compat_server.url + "/v1/completions",
            "tokenizer": compat_model, "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1}
    results, samples = run_lm_eval(tmp_path, "local-completions", args, "tidal_ll")
    for sample, want in zip(samples, scores):
        sent = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert sent == [(sample["doc"]["question"], DELIM + c) for c in CHOICES]
        got = [float(resp[0][0]) for resp in sample["resps"]]  # the samples file writes them as strings
        assert got == pytest.approx(want, abs=1e-4), sample["doc"]
    assert results["tidal_ll"]["acc,none"] == 1.0
