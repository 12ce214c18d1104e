"""Cost of the RL numerics options (docs/numerics.md): batch_invariant vs default on the CPU, and
the fp32 LM head's time and memory (CPU, and CUDA when present).

    python benchmarks/numerics.py                      # both parts, JSON to benchmarks/results/local/ (--publish: results/)
    python benchmarks/numerics.py --skip-engine        # only the LM-head part (e.g. on a GPU)

Engine part: one LLM.generate over the same random workload with batch_invariant off and on
(same engine shape, fp32, random weights, prompt + output tokens / wall time), best of --repeats
interleaved runs.
LM-head part: compute_logits of N rows, bf16 head vs fp32 head, for head shapes of real models
(random weights), median time per call and the bytes the fp32 copy of the weight holds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402

# A small but not dispatch-bound shape for the CPU engine run.
ENGINE_MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, vocab_size=8192)
HEADS = {"qwen3-0.6b": (1024, 151936), "qwen2.5-7b": (3584, 152064), "llama3-8b": (4096, 128256)}


def engine_runs(path: str, num_seqs: int, prompt_len: int, out_len: int, repeats: int) -> list[dict]:
    """Both modes in one process, their runs interleaved (a loaded machine slows both alike)."""
    from tidal import LLM, SamplingParams
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (prompt_len,), generator=g).tolist() for _ in range(num_seqs)]
    params = SamplingParams(max_tokens=out_len, temperature=1.0, top_p=0.9, seed=1, ignore_eos=True, logprobs=0)
    modes = (False, True)
    llms = [LLM(path, dtype="float32", device="cpu", num_kv_blocks=4096, block_size=16, max_num_seqs=64,
                max_num_batched_tokens=1024, batch_invariant=bi, enable_prefix_caching=False) for bi in modes]
    times: dict[bool, list[float]] = {bi: [] for bi in modes}
    try:
        for llm in llms:
            llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        for _ in range(repeats):
            for bi, llm in zip(modes, llms):
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times[bi].append(time.perf_counter() - t0)
    finally:
        for llm in llms:
            llm.shutdown()
    return [{"batch_invariant": bi, "seconds": min(times[bi]), "all_seconds": times[bi],
             "tok_s": num_seqs * out_len / min(times[bi]),
             "total_tok_s": num_seqs * (prompt_len + out_len) / min(times[bi])} for bi in modes]


def head_run(name: str, hidden: int, vocab: int, rows: int, device: str, iters: int) -> dict:
    from tidal.models.layers import Linear
    head = Linear(hidden, vocab, False, torch.bfloat16).to(device)
    head.weight.normal_(std=0.02)
    x = torch.randn(rows, hidden, device=device).bfloat16()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3

    with torch.inference_mode():
        bf16_ms = timed(lambda: torch.log_softmax(head(x).float(), dim=-1))
        fp32_ms = timed(lambda: torch.log_softmax(head.forward_fp32(x), dim=-1))
    return {"model": name, "device": device, "rows": rows, "hidden": hidden, "vocab": vocab,
            "bf16_head_ms": bf16_ms, "fp32_head_ms": fp32_ms, "time_ratio": fp32_ms / bf16_ms,
            "bf16_weight_mib": hidden * vocab * 2 / 2**20, "fp32_copy_mib": hidden * vocab * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--head-rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--heads", nargs="+", default=["qwen3-0.6b"], choices=sorted(HEADS))
    ap.add_argument("--head-iters", type=int, default=10)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--head-devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    ap.add_argument("--out", default=None, help="default: numerics.json in the results dir")
    add_publish_flag(ap)
    args = ap.parse_args()
    args.out = args.out or str(results_dir(args.publish) / "numerics.json")
    torch.manual_seed(0)
    result: dict = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

    if not args.skip_engine:
        from tidal.models.tiny import make_tiny_checkpoint
        path = make_tiny_checkpoint(tempfile.mkdtemp(prefix="tidal-numerics-"), "qwen3", **ENGINE_MODEL)
        rows = engine_runs(path, args.num_seqs, args.prompt_len, args.out_len, args.repeats)
        overhead = rows[0]["tok_s"] / rows[1]["tok_s"] - 1
        result["engine"] = {"model": ENGINE_MODEL, "num_seqs": args.num_seqs, "prompt_len": args.prompt_len,
                            "out_len": args.out_len, "runs": rows, "batch_invariant_time_overhead": overhead}
        print(f"\nengine, CPU ({torch.get_num_threads()} threads), {args.num_seqs} seqs x "
              f"({args.prompt_len} prompt + {args.out_len} out), fp32 model {ENGINE_MODEL}")
        print(f"{'mode':<18}{'seconds':>10}{'out tok/s':>12}{'all tok/s':>12}")
        for r in rows:
            mode = "batch_invariant" if r["batch_invariant"] else "default"
            print(f"{mode:<18}{r['seconds']:>10.2f}{r['tok_s']:>12.1f}{r['total_tok_s']:>12.1f}")
        print(f"batch_invariant time overhead: {overhead:+.1%}")

    devices = args.head_devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    heads = []
    for device in devices:
        for name in args.heads:
            for n in args.head_rows:
                heads.append(head_run(name, *HEADS[name], n, device, args.head_iters))
    result["lm_head"] = heads
    print(f"\n{'head':<12}{'device':<7}{'rows':>6}{'bf16 ms':>10}{'fp32 ms':>10}{'x':>7}{'fp32 copy MiB':>15}")
    for h in heads:
        print(f"{h['model']:<12}{h['device']:<7}{h['rows']:>6}{h['bf16_head_ms']:>10.3f}{h['fp32_head_ms']:>10.3f}"
              f"{h['time_ratio']:>7.2f}{h['fp32_copy_mib']:>15.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
