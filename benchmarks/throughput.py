"""Offline throughput: the nano-vllm workload on Tidal, HF transformers, and the bandwidth ceiling.

    PYTHONUNBUFFERED=1 python benchmarks/throughput.py                   # all three models, on a GPU
    python benchmarks/throughput.py --models qwen3-0.6b --skip-hf --tiny  # CPU smoke run

Workload (as nano-vllm's bench.py): 256 sequences, prompt lengths and output lengths uniform
in [100, 1024], random token ids, ignore_eos, temperature 0.6, fixed seed; random weights
(load_format="dummy") in the shapes of the public Qwen3-0.6B, Qwen2.5-0.5B and Qwen2.5-7B
configs (written below; nothing is downloaded). Reports, per model:
  tidal     output tokens / wall time of one LLM.generate over the whole workload
  hf        transformers `generate` on a sub-sample, batched (left padding), capped by time
  ceiling   memory-bandwidth bound: every decode step reads the weights once and the live KV
            once, at the measured device-to-device copy bandwidth (prefill ignored)
  batch-1   decode tok/s of one sequence, and its weight+KV-read ceiling
Prints a table, writes JSON and a PNG into --out-dir.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402
from tidal import LLM, SamplingParams  # noqa: E402

_COMMON = dict(hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=1000000.0,
               rope_scaling=None, attention_dropout=0.0, use_cache=True, use_sliding_window=False,
               torch_dtype="bfloat16", bos_token_id=151643)
# Public architecture numbers (config.json of each model on the HF hub).
CONFIGS: dict[str, dict] = {
    "qwen3-0.6b": dict(_COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       max_window_layers=28, sliding_window=None, attention_bias=False,
                       tie_word_embeddings=True, vocab_size=151936, eos_token_id=151645),
    "qwen2.5-0.5b": dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24,
                         sliding_window=32768, tie_word_embeddings=True, vocab_size=151936,
                         eos_token_id=151643),
    "qwen2.5-7b": dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=131072, max_window_layers=28,
                       sliding_window=131072, tie_word_embeddings=False, vocab_size=152064,
                       eos_token_id=151643),
}
# A model small enough for a CPU smoke run of this script.
TINY = dict(CONFIGS["qwen3-0.6b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=4096)


def write_config(name: str, cfg: dict, root: Path) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(path)


def make_workload(num_seqs: int, lo: int, max_in: int, max_out: int, vocab: int,
                  seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, min(10000, vocab - 2)) for _ in range(rng.randint(lo, max_in))]
               for _ in range(num_seqs)]
    out_lens = [rng.randint(lo, max_out) for _ in range(num_seqs)]
    return prompts, out_lens


def _num(x: float, width: int, fmt: str) -> str:
    """`x` formatted, or "-" where there is no number (the CPU has no bandwidth ceiling)."""
    return f"{'-':>{width}s}" if not math.isfinite(x) else f"{x:{width}{fmt}}"


def _pct(a: float, b: float, width: int) -> str:
    return f"{'-':>{width}s}" if not (math.isfinite(b) and b > 0) else f"{100 * a / b:{width - 1}.1f}%"


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 50)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(1 << 28, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(55):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * src.numel() * src.element_size() / sorted(times[5:])[len(times[5:]) // 2]


def matmul_peak_flops(device: torch.device) -> float:
    """bf16 FLOP/s of a large square matmul (median of 20): the compute roof of the roofline."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(25):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    return 2 * 8192 ** 3 / sorted(times[5:])[len(times[5:]) // 2]


def roofline_tok_s(prompt_lens: list[int], out_lens: list[int], weight_bytes: int, kv_tok: int, bw: float,
                   flops_tok: float, attn_flops_ctx: float, peak: float) -> float:
    """As ceiling_tok_s, but each step takes the longer of its bytes at `bw` and its FLOPs at
    `peak` (2 x parameters per token, plus attention's 4 x heads x head_dim per context token):
    large batches of a 7B model are compute-bound, where the bandwidth ceiling alone is unreachable."""
    total_s = 0.0
    for s in range(max(out_lens)):
        live = [p + s for p, o in zip(prompt_lens, out_lens) if o > s]
        nbytes = weight_bytes + kv_tok * sum(live)
        flops = flops_tok * len(live) + attn_flops_ctx * sum(live)
        total_s += max(nbytes / bw, flops / peak)
    return sum(out_lens) / total_s


def model_bytes(cfg: dict, itemsize: int = 2) -> tuple[int, int]:
    """(weight bytes read per decode step, KV bytes per cached token over all layers)."""
    h, inter, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * inter + 2 * h
    # The embedding is gathered (a few rows), the lm_head read whole each step.
    weights = layers * per_layer + h * v + h
    kv = layers * 2 * hkv * d
    return weights * itemsize, kv * itemsize


def ceiling_tok_s(prompt_lens: list[int], out_lens: list[int], weight_bytes: int, kv_tok: int, bw: float) -> float:
    """All sequences decode together from the start; step s reads the weights and the KV of
    every sequence still running (prompt + s tokens): the roofline with no compute roof."""
    return roofline_tok_s(prompt_lens, out_lens, weight_bytes, kv_tok, bw, 0.0, 0.0, math.inf)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_tidal(path: str, prompts: list[list[int]], out_lens: list[int], args, overlap: bool = True,
              extras: bool = True, fused: bool = True, **numerics) -> dict:
    """Tidal on the workload; extras: also the stage profile (--profile) and the batch-1 rate;
    fused=False: the decoder layers' small ops as torch ops instead of the fused Triton kernels;
    numerics: batch_invariant / lm_head_dtype (docs/numerics.md)."""
    t0 = time.perf_counter()
    llm = LLM(path, load_format="dummy", device=args.device, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, overlap_scheduling=overlap, seed=0,
              fused_kernels="auto" if fused else "off", **numerics,
              **({"num_kv_blocks": 512} if args.tiny else {}))
    core = llm.engine.core
    mode = "cuda_graph" if core.runner.graphs is not None else "eager"
    startup = time.perf_counter() - t0
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in out_lens]
    # Twice: the first run is the headline (what a fresh engine does with the workload); the
    # second shows whether anything in the first was a one-off (kernel compiles, allocations).
    # The prefix cache is flushed before each, or the repeat would skip the prefill of every
    # prompt it has already seen.
    times = []
    first_run_profile = None
    for run in range(2):
        llm.flush_cache()
        sync(args.device)
        steps0, overlapped0 = core.step_count, core.num_overlapped_steps
        t0 = time.perf_counter()
        if run == 0 and extras and args.profile_first:
            first_run_profile = profile_steps(llm, prompts, out_lens, args.device, graph_replay=False)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    elapsed = times[0]
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(out_lens), f"generated {n_out} tokens, expected {sum(out_lens)}"
    res = dict(tok_s=n_out / elapsed, seconds=elapsed, tok_s_second_run=n_out / times[1],
               output_tokens=n_out, steps=core.step_count - steps0,
               overlapped_steps=core.num_overlapped_steps - overlapped0, preemptions=core.scheduler.num_preemptions,
               mode=mode, overlap_scheduling=overlap, fused_kernels=fused, startup_s=startup,
               num_kv_blocks=core.runner.num_blocks)
    if first_run_profile is not None:
        res["profile_first_run"] = first_run_profile
    if extras and args.profile:
        res["profile"] = profile_steps(llm, prompts, out_lens, args.device)
    if extras:
        # Batch 1: decode rate from the difference of two lengths (cancels prefill and start-up).
        prompt = prompts[0][:128]
        times = {}
        for n in (1, args.batch1_tokens + 1):
            sync(args.device)
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n), use_tqdm=False)
            sync(args.device)
            times[n] = time.perf_counter() - t0
        res["batch1_tok_s"] = args.batch1_tokens / (times[args.batch1_tokens + 1] - times[1])
        res["batch1_ctx"] = len(prompt) + args.batch1_tokens // 2
    llm.shutdown()
    del llm, outs, core
    free_memory()
    if torch.cuda.is_available():
        res["cuda_allocated_after_shutdown"] = torch.cuda.memory_allocated()
    return res


def fill_decode_batch(runner, batch: int, ctx: int) -> None:
    """Put a synthetic decode step of `batch` sequences at context `ctx` into the CUDA graphs'
    static inputs: random block tables, nothing stored (slot -1). Undo with
    `runner.graphs.seq_lens.zero_()` before the engine runs again."""
    g = runner.graphs
    nb = -(-(ctx + 1) // g.block_size)
    g.block_tables[:batch, :nb] = torch.randint(0, runner.num_blocks, (batch, nb), dtype=torch.int32,
                                                device=g.block_tables.device)
    g.seq_lens[:batch] = ctx + 1
    g.slot_mapping[:batch] = -1
    g.positions[:batch] = ctx


def profile_steps(llm: LLM, prompts: list[list[int]], out_lens: list[int], device: str,
                  graph_replay: bool = True) -> dict:
    """Where a step's time goes, over the whole workload, with overlap on and no extra syncs.

    Per stage: host time of the engine's stages per step (`ModelRunner.collect` is where the host
    waits for the GPU; wall time minus that wait is the host's own work). Per phase (the steps cut
    into tenths): batch size, wall time per step, the host's wait in `collect`, and on CUDA the
    GPU's view from two events per step, one at `launch` entry and one after it: `gpu_step` is
    the time between them on the GPU's clock, `gpu_gap` the idle time from one step's end event
    to the next step's start event (the GPU waiting for the host to enqueue). Then the GPU time of
    one replay of the largest decode graph at a 1k context."""
    from tidal.engine.core import EngineCore
    from tidal.engine.scheduler import Scheduler
    from tidal.runner.runner import ModelRunner

    core, runner = llm.engine.core, llm.engine.core.runner
    acc: dict[str, float] = {}
    trace: list[list] = []  # per launch: [t_host, num_seqs, num_tokens, ev_start, ev_end, collect_wait_s]
    by_step: dict[int, list] = {}
    cuda = device == "cuda"

    def timed(cls, name: str):
        fn = cls.__dict__[name]
        label = f"{cls.__name__}.{name}"

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
            return out
        setattr(cls, name, wrapper)
        return fn

    stages = [(Scheduler, "schedule"), (Scheduler, "advance"), (Scheduler, "resolve"), (EngineCore, "_emit"),
              (EngineCore, "step"), (ModelRunner, "prepare"), (ModelRunner, "_sample")]
    originals = {(c, n): timed(c, n) for c, n in stages}
    launch, collect = ModelRunner.__dict__["launch"], ModelRunner.__dict__["collect"]

    def traced_launch(self, batch, step, prev=None):
        t = time.perf_counter()
        ev = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)] if cuda else [None, None]
        if cuda:
            ev[0].record()
        h = launch(self, batch, step, prev)
        if cuda:
            ev[1].record()
        acc["ModelRunner.launch"] = acc.get("ModelRunner.launch", 0.0) + time.perf_counter() - t
        row = [t, len(batch.reqs), sum(batch.num_new_tokens), ev[0], ev[1], 0.0]
        trace.append(row)
        by_step[step] = row
        return h

    def traced_collect(self, h):
        t = time.perf_counter()
        out = collect(self, h)
        dt = time.perf_counter() - t
        acc["ModelRunner.collect"] = acc.get("ModelRunner.collect", 0.0) + dt
        if h.step in by_step:
            by_step[h.step][5] = dt
        return out

    ModelRunner.launch, ModelRunner.collect = traced_launch, traced_collect
    originals[(ModelRunner, "launch")], originals[(ModelRunner, "collect")] = launch, collect
    llm.flush_cache()  # no prefix reuse from an earlier run of the same prompts
    steps0 = core.step_count
    t0 = time.perf_counter()
    try:
        llm.generate(prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in out_lens],
                     use_tqdm=False)
    finally:
        for (c, n), f in originals.items():
            setattr(c, n, f)
    t_end = time.perf_counter()
    sync(device)
    steps = core.step_count - steps0
    wall = 1e3 * (t_end - t0) / steps
    per_step = {k: 1e3 * v / steps for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    res = dict(steps=steps, wall_ms_per_step=wall, ms_per_step=per_step,
               host_busy_ms_per_step=wall - per_step.get("ModelRunner.collect", 0.0), phases=[])
    starts = [r[0] for r in trace] + [t_end]
    for k in range(10):
        lo, hi = k * len(trace) // 10, (k + 1) * len(trace) // 10
        if hi <= lo:
            continue
        rows = trace[lo:hi]
        ph = dict(steps=f"{lo}-{hi - 1}", seqs=sum(r[1] for r in rows) / len(rows),
                  tokens=sum(r[2] for r in rows) / len(rows),
                  wall_ms=1e3 * (starts[hi] - starts[lo]) / len(rows),
                  collect_wait_ms=1e3 * sum(r[5] for r in rows) / len(rows))
        if cuda:
            ph["gpu_step_ms"] = sum(r[3].elapsed_time(r[4]) for r in rows) / len(rows)
            gaps = [trace[i - 1][4].elapsed_time(trace[i][3]) for i in range(max(lo, 1), hi)]
            ph["gpu_gap_ms"] = sum(gaps) / max(len(gaps), 1)
        res["phases"].append(ph)
    g = runner.graphs
    if g is not None and cuda and graph_replay:
        bs = g.batch_sizes[-1]
        ctx = min(1000, g.max_blocks * g.block_size - 1)
        fill_decode_batch(runner, bs, ctx)
        g.graphs[bs].replay()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.graphs[bs].replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        res[f"graph_replay_ms_bs{bs}_ctx{ctx}"] = sorted(times)[5]
        g.seq_lens.zero_()
    print(f"  profile: {json.dumps({k: v for k, v in res.items() if k != 'phases'})}", flush=True)
    print(f"  {'steps':>10s} {'seqs':>6s} {'tokens':>7s} {'wall ms':>8s} {'wait ms':>8s} {'gpu step':>9s} "
          f"{'gpu gap':>8s}", flush=True)
    for ph in res["phases"]:
        print(f"  {ph['steps']:>10s} {ph['seqs']:6.0f} {ph['tokens']:7.0f} {ph['wall_ms']:8.2f} "
              f"{ph['collect_wait_ms']:8.2f} {ph.get('gpu_step_ms', float('nan')):9.2f} "
              f"{ph.get('gpu_gap_ms', float('nan')):8.2f}", flush=True)
    return res


def run_hf(cfg: dict, prompts: list[list[int]], out_lens: list[int], args) -> dict:
    """HF generate on the first hf_seqs requests in one left-padded batch, for at most
    hf_max_time seconds; counts the tokens each request would keep (its own max_tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    sub_p, sub_o = prompts[:args.hf_seqs], out_lens[:args.hf_seqs]
    width = max(map(len, sub_p))
    ids = torch.full((len(sub_p), width), cfg["vocab_size"] - 1, dtype=torch.long)  # the pad id
    mask = torch.zeros_like(ids)
    for i, p in enumerate(sub_p):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(args.device), mask.to(args.device)
    new = max(sub_o)
    kw = dict(do_sample=True, temperature=0.6, top_k=0, top_p=1.0, pad_token_id=cfg["vocab_size"] - 1)
    with torch.inference_mode():
        model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=4, min_new_tokens=4, **kw)
        sync(args.device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             max_time=args.hf_max_time, **kw)
        sync(args.device)
    elapsed = time.perf_counter() - t0
    steps = out.shape[1] - width
    useful = sum(min(o, steps) for o in sub_o)
    del model, out
    free_memory()
    return dict(tok_s=useful / elapsed, seconds=elapsed, seqs=len(sub_p), steps=steps, planned_steps=new,
                useful_tokens=useful, capped=steps < new)


def run_hf_with_fallback(cfg: dict, prompts: list[list[int]], out_lens: list[int], args) -> dict:
    """HF materialises large prefill temporaries: halve the batch on out-of-memory."""
    errors = []
    while args.hf_seqs >= 1:
        try:
            return dict(run_hf(cfg, prompts, out_lens, args), oom_retries=errors)
        except torch.OutOfMemoryError as e:
            errors.append(f"{args.hf_seqs} seqs: {str(e)[:120]}")
            free_memory()
            args.hf_seqs //= 2
    return dict(error="; ".join(errors))


def run_hf_cb(cfg: dict, prompts: list[list[int]], out_lens: list[int], args) -> dict:
    """HF transformers' continuous batching, in a child process: a failure inside HF's manager
    thread cannot keep GPU memory held in this one (it did once: the next model's KV cache no
    longer fit)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    free_before = torch.cuda.mem_get_info()[0] if args.device == "cuda" else 0
    results = ctx.Queue()
    child = ctx.Process(target=_hf_cb_child, args=(cfg, prompts, out_lens, args.device, args.hf_max_time, results))
    child.start()
    try:
        return results.get(timeout=args.hf_max_time + 300)
    except Exception as e:
        return dict(error=f"no result from the HF continuous-batching child: {type(e).__name__}")
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join(timeout=30)
        wait_gpu_memory_back(args.device, free_before)


def wait_gpu_memory_back(device: str, free_before: int, timeout_s: float = 60.0) -> None:
    """Until the device's free memory is back to within 1 GiB of `free_before`: a killed child's
    memory is released asynchronously, and a Tidal engine started meanwhile sizes its KV cache
    from what is free (one H200 run got 450 blocks instead of 4,381 that way, and preempted)."""
    if device != "cuda":
        return
    deadline = time.monotonic() + timeout_s
    while torch.cuda.mem_get_info()[0] < free_before - (1 << 30):
        if time.monotonic() > deadline:
            print(f"warning: GPU memory not back after {timeout_s:.0f} s "
                  f"({torch.cuda.mem_get_info()[0] / 2**30:.1f} of {free_before / 2**30:.1f} GiB free)", flush=True)
            return
        time.sleep(0.2)


def _hf_cb_child(cfg: dict, prompts, out_lens, device: str, max_time: float, results) -> None:
    # TIDAL_HF_CB_SITE: a directory holding another transformers for this child only (the GPU
    # machine's 5.17 fails inside its continuous-batching manager; 5.23 does not).
    site = os.environ.get("TIDAL_HF_CB_SITE")
    if site:
        sys.path.insert(0, site)
    try:
        results.put(_hf_cb(cfg, prompts, out_lens, argparse.Namespace(device=device, hf_max_time=max_time)))
    except Exception as e:
        results.put(dict(error=f"{type(e).__name__}: {e}"[:300]))


def _hf_cb(cfg: dict, prompts: list[list[int]], out_lens: list[int], args) -> dict:
    """HF's paged-attention continuous-batching manager: every request with its own
    max_new_tokens and EOS disabled, for at most hf_max_time seconds after a warm-up request;
    counts the tokens of the requests that finished in time."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, refused = None, []
    for impl in ("paged|sdpa", "sdpa_paged", "paged|eager"):  # the paged names differ between HF releases
        try:
            with torch.device(args.device):
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=impl).eval()
            break
        except (ValueError, ImportError) as e:
            refused.append(f"{impl}: {str(e)[:80]}")
    if model is None:
        raise ValueError("no paged attention implementation accepted: " + "; ".join(refused))
    model_impl = model.config._attn_implementation
    gen = GenerationConfig(max_new_tokens=max(out_lens), do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                           eos_token_id=-1, pad_token_id=cfg["vocab_size"] - 1)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        warm = manager.add_request(prompts[0][:16], max_new_tokens=4)
        manager.get_result(request_id=warm, timeout=600)
        sync(args.device)
        t0 = time.perf_counter()
        ids = {manager.add_request(p, max_new_tokens=o): o for p, o in zip(prompts, out_lens)}
        done: dict[str, int] = {}
        deadline = t0 + args.hf_max_time
        while len(done) < len(ids) and time.perf_counter() < deadline:
            r = manager.get_result(timeout=max(0.01, deadline - time.perf_counter()))
            if r is not None and r.request_id in ids and r.is_finished():
                done[r.request_id] = len(r.generated_tokens)
        sync(args.device)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True, timeout=60)
    del model, manager
    free_memory()
    return dict(tok_s=sum(done.values()) / elapsed, seconds=elapsed, seqs=len(ids), finished=len(done),
                attn_implementation=model_impl,
                useful_tokens=sum(done.values()), capped=len(done) < len(ids))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    series = [("Tidal", "tidal"), ("HF generate", "hf"), ("bandwidth ceiling", "ceiling")]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        vals = [results["models"][n].get(key, {}).get("tok_s", 0.0) or 0.0 for n in names]
        ax.bar([i + j * w for i in range(len(names))], vals, w, label=label)
    ax.set_xticks([i + w for i in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens / s (log)")
    ax.set_title(f"256 seqs, in/out ~U[100,1024] — {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-seqs", type=int, default=64)
    ap.add_argument("--hf-max-time", type=float, default=25.0)
    ap.add_argument("--hf-cb", action="store_true",
                    help="also run HF transformers' continuous batching (generate_batch's manager) on the whole workload")
    ap.add_argument("--hf-cb-max-time", type=float, default=60.0)
    ap.add_argument("--profile", action="store_true", help="also time the engine's stages per step (first model)")
    ap.add_argument("--profile-first", action="store_true",
                    help="trace the first (headline) run per phase as --profile does (first model)")
    ap.add_argument("--serial", nargs="*", default=[], metavar="MODEL",
                    help="also run these models with overlap scheduling off, side by side")
    ap.add_argument("--unfused", nargs="*", default=[], metavar="MODEL",
                    help="also run these models with the fused layer kernels off (torch ops), side by side")
    ap.add_argument("--batch-invariant", nargs="*", default=[], metavar="MODEL",
                    help="also run these models with batch_invariant=True, side by side")
    ap.add_argument("--lm-head-fp32", nargs="*", default=[], metavar="MODEL",
                    help="also run these models with lm_head_dtype='float32', side by side")
    ap.add_argument("--tiny", action="store_true", help="a tiny model in place of each config (smoke run)")
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/results/local/ (--publish: results/)")
    add_publish_flag(ap)
    ap.add_argument("--tag", default="throughput", help="file name stem of the JSON and PNG")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of a saved result and exit")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).with_suffix(".png"))
        return

    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    peak = matmul_peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = dict(device=name, copy_bandwidth_bytes_s=bw, matmul_peak_flops=peak, torch=torch.__version__,
                         args=vars(args), models={})
    out_dir = Path(args.out_dir) if args.out_dir else results_dir(args.publish)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tidal-bench-"))
    hf_seqs = args.hf_seqs
    for i, model in enumerate(args.models):
        args.hf_seqs, args.profile = hf_seqs, args.profile and i == 0
        args.profile_first = args.profile_first and i == 0
        cfg = TINY if args.tiny else CONFIGS[model]
        path = write_config(model, cfg, tmp)
        prompts, out_lens = make_workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len,
                                          cfg["vocab_size"], args.seed)
        w_bytes, kv_tok = model_bytes(cfg)
        row: dict = dict(weight_bytes=w_bytes, kv_bytes_per_token=kv_tok,
                         prompt_tokens=sum(map(len, prompts)), output_tokens=sum(out_lens))
        row["ceiling"] = dict(tok_s=ceiling_tok_s([len(p) for p in prompts], out_lens, w_bytes, kv_tok, bw))
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        attn = 4 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * d
        row["roofline"] = dict(tok_s=roofline_tok_s([len(p) for p in prompts], out_lens, w_bytes, kv_tok, bw,
                                                    2 * (w_bytes / 2), attn, peak))  # bf16: 2 B per parameter
        if not args.skip_hf:  # first: Tidal takes most of the GPU memory for its KV cache
            print(f"[{model}] hf ...", flush=True)
            row["hf"] = run_hf_with_fallback(cfg, prompts, out_lens, args)
        if args.hf_cb:
            print(f"[{model}] hf continuous batching ...", flush=True)
            cb_args = argparse.Namespace(**{**vars(args), "hf_max_time": args.hf_cb_max_time})
            row["hf_cb"] = run_hf_cb(cfg, prompts, out_lens, cb_args)
        print(f"[{model}] tidal ...", flush=True)
        row["tidal"] = run_tidal(path, prompts, out_lens, args)
        if model in args.serial:
            print(f"[{model}] tidal, overlap scheduling off ...", flush=True)
            row["tidal_serial"] = run_tidal(path, prompts, out_lens, args, overlap=False, extras=False)
        if model in args.unfused:
            print(f"[{model}] tidal, fused layer kernels off ...", flush=True)
            row["tidal_unfused"] = run_tidal(path, prompts, out_lens, args, extras=False, fused=False)
        if model in args.batch_invariant:
            print(f"[{model}] tidal, batch_invariant=True ...", flush=True)
            row["tidal_invariant"] = run_tidal(path, prompts, out_lens, args, extras=False, batch_invariant=True)
        if model in args.lm_head_fp32:
            print(f"[{model}] tidal, lm_head_dtype=float32 ...", flush=True)
            row["tidal_fp32_head"] = run_tidal(path, prompts, out_lens, args, extras=False, lm_head_dtype="float32")
        row["batch1_ceiling_tok_s"] = bw / (w_bytes + kv_tok * row["tidal"]["batch1_ctx"])
        results["models"][model] = row
        (out_dir / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
        print(f"[{model}] {json.dumps(row)}", flush=True)

    print(f"\ndevice: {name}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'model':14s} {'tidal tok/s':>12s} {'2nd run':>8s} {'hf tok/s':>10s} {'x hf':>6s} {'ceiling':>9s} "
          f"{'% ceil':>7s} {'roofline':>9s} {'% roof':>7s} {'b1 tok/s':>9s} {'b1 ceil':>8s} {'% b1':>6s} {'kv blocks':>9s} "
          f"{'preempt':>7s}")
    for model, r in results["models"].items():
        t, hf, c = r["tidal"]["tok_s"], r.get("hf", {}).get("tok_s"), r["ceiling"]["tok_s"]
        roof = r["roofline"]["tok_s"]
        b1, b1c = r["tidal"]["batch1_tok_s"], r["batch1_ceiling_tok_s"]
        hf_s = f"{hf:10.0f} {t / hf:6.1f}" if hf else f"{'-':>10s} {'-':>6s}"
        print(f"{model:14s} {t:12.0f} {r['tidal']['tok_s_second_run']:8.0f} {hf_s} {_num(c, 9, '.0f')} "
              f"{_pct(t, c, 7)} {_num(roof, 9, '.0f')} {_pct(t, roof, 7)} {b1:9.1f} {_num(b1c, 8, '.1f')} "
              f"{_pct(b1, b1c, 6)} {r['tidal']['num_kv_blocks']:9d} {r['tidal']['preemptions']:7d}")
    for model, r in results["models"].items():
        cb = r.get("hf_cb", {})
        if cb.get("tok_s"):
            print(f"{model}: HF continuous batching {cb['tok_s']:.0f} tok/s ({cb['finished']}/{cb['seqs']} finished in "
                  f"{cb['seconds']:.1f} s) -> Tidal {r['tidal']['tok_s'] / cb['tok_s']:.1f}x")
        elif cb:
            print(f"{model}: HF continuous batching gave nothing: {cb.get('error', cb)}")
    for key, label, base in (("tidal_serial", "overlap scheduling", "serial steps"),
                             ("tidal_unfused", "fused layer kernels", "torch ops")):
        for model, r in results["models"].items():
            if key in r:
                a, b = r["tidal"], r[key]
                print(f"{model}: {label} {a['tok_s']:.0f} / {a['tok_s_second_run']:.0f} tok/s (1st / 2nd run) vs "
                      f"{base} {b['tok_s']:.0f} / {b['tok_s_second_run']:.0f} "
                      f"({a['tok_s'] / b['tok_s']:.2f}x / {a['tok_s_second_run'] / b['tok_s_second_run']:.2f}x)")
    for key, label in (("tidal_invariant", "batch_invariant=True"), ("tidal_fp32_head", "lm_head_dtype=float32")):
        for model, r in results["models"].items():
            if key in r:
                a, b = r["tidal"], r[key]
                print(f"{model}: {label} {b['tok_s']:.0f} / {b['tok_s_second_run']:.0f} tok/s (1st / 2nd run) = "
                      f"{b['tok_s'] / a['tok_s']:.2f}x / {b['tok_s_second_run'] / a['tok_s_second_run']:.2f}x "
                      "the default")
    if device.type == "cuda":
        plot(results, out_dir / f"{args.tag}.png")


if __name__ == "__main__":
    main()
