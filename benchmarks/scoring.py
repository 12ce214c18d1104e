"""Cost of penalties and prompt logprobs (docs/numerics.md) on one engine, random weights of a real
model's shape (default Qwen3-0.6B: its 151936-token vocabulary is what prompt logprobs pay for).

    python benchmarks/scoring.py                 # CUDA when present, else CPU with a smaller model
    python benchmarks/scoring.py --publish       # JSON into benchmarks/results/ instead of results/local/

Decode: --num-seqs sequences of --prompt-len + --out-len greedy tokens, without and with all three
penalties on every row (output tokens per second). Scoring: --num-seqs prompts of --score-len
tokens prefilled with max_tokens=1 and no prompt logprobs (the baseline), then scored with
max_tokens=0 and prompt_logprobs 0 and 5 (prompt tokens per second). Best of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
                 tie_word_embeddings=True)
CPU_MODEL = dict(QWEN3_06B, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=32768)


def _checkpoint(shape: dict) -> str:
    """A config-only directory: the engine draws random weights for it (load_format='dummy')."""
    import transformers
    path = tempfile.mkdtemp(prefix="tidal-scoring-")
    transformers.Qwen3Config(**shape).save_pretrained(path)
    return path


def _best(llm, prompts, params, repeats: int) -> float:
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up (graphs, kernels)
    times = []
    for _ in range(repeats):
        llm.flush_cache()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--score-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="default: scoring.json in the results dir")
    add_publish_flag(ap)
    args = ap.parse_args()
    args.out = args.out or str(results_dir(args.publish) / "scoring.json")
    from tidal import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    shape = QWEN3_06B if cuda else CPU_MODEL
    kw = dict(dtype="bfloat16", device="cuda", gpu_memory_utilization=0.5) if cuda else \
        dict(dtype="float32", device="cpu", kv_cache_memory_gb=2.0)
    llm = LLM(_checkpoint(shape), load_format="dummy", max_num_seqs=args.num_seqs, max_num_batched_tokens=8192, **kw)
    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_seqs)]
    long_prompts = [torch.randint(0, vocab, (args.score_len,), generator=g).tolist() for _ in range(args.num_seqs)]
    rows = []
    try:
        greedy = dict(max_tokens=args.out_len, temperature=0.0, ignore_eos=True)
        penalties = dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2)
        for name, extra in (("decode", {}), ("decode + penalties", penalties)):
            s = _best(llm, prompts, SamplingParams(**greedy, **extra), args.repeats)
            rows.append({"run": name, "seconds": s, "tok_s": args.num_seqs * args.out_len / s, "unit": "out tok/s"})
        for name, params in (("prefill (max_tokens=1)", SamplingParams(max_tokens=1)),
                             ("score, prompt_logprobs=0", SamplingParams(max_tokens=0, prompt_logprobs=0)),
                             ("score, prompt_logprobs=5", SamplingParams(max_tokens=0, prompt_logprobs=5))):
            s = _best(llm, long_prompts, params, args.repeats)
            rows.append({"run": name, "seconds": s, "tok_s": args.num_seqs * args.score_len / s,
                         "unit": "prompt tok/s"})
    finally:
        llm.shutdown()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{device}, {'bf16' if cuda else 'fp32'} model {shape}, {args.num_seqs} seqs")
    print(f"{'run':<28}{'seconds':>10}{'tok/s':>14}  unit")
    for r in rows:
        print(f"{r['run']:<28}{r['seconds']:>10.3f}{r['tok_s']:>14.0f}  {r['unit']}")
    result = {"device": device, "torch": torch.__version__, "model": shape, "args": vars(args), "runs": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
