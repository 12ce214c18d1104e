"""GPU time of one decode step, kernel by kernel (torch.profiler / CUPTI), on dummy weights.

A decode step of B sequences at context C goes through the model eagerly with the same attention
metadata the CUDA graphs use (so the same kernels and split counts), then the lm_head and the
sampler (temperature 0.6). Kernels are grouped by what they do; the table shows each group's
GPU time per step next to its bandwidth floor where one is defined.

    python benchmarks/step_kernels.py --model qwen3-0.6b --batch 256 14 --ctx 1000   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.throughput import (CONFIGS, copy_bandwidth, fill_decode_batch, model_bytes,  # noqa: E402
                                   write_config)
from tidal import LLM  # noqa: E402
from tidal.attention.context import ForwardContext  # noqa: E402
from tidal.runner.sampler import SamplingTensors  # noqa: E402
from tidal.sampling_params import SamplingParams  # noqa: E402

GROUPS = [  # first match wins; matched against the lower-cased kernel name
    ("attention", ("paged_decode", "_decode", "reduce_splits")),
    ("kv_store", ("store_kv",)),
    ("sampling", ("race", "argmax", "argmin", "max_kernel", "where", "div", "gather", "index_select")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas", "xmma")),
    ("norm_rope_act", ("rms_norm", "qk_norm_rope", "silu", "add_rms", "rope", "mul", "add", "cat",
                       "copy", "elementwise", "vectorized", "unrolled")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_step(llm: LLM, batch: int, ctx: int, repeats: int) -> dict:
    runner = llm.engine.core.runner
    g = runner.graphs
    if g is None:
        raise SystemExit("CUDA graphs are off: this script reads their static buffers")
    fill_decode_batch(runner, batch, ctx)
    meta = g._meta(batch)
    fctx = ForwardContext(meta, runner.kv_cache, runner.backend)
    params = [SamplingParams(temperature=0.6)] * batch
    st = SamplingTensors.build(params, list(range(batch)), [0] * batch, "cuda")

    def step():
        hidden = runner.model(g.input_ids[:batch], g.positions[:batch], fctx)
        logits = runner.model.compute_logits(hidden)
        return runner.sampler(logits, st).token_ids

    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, [0.0, 0])
            kernels[ev.name][0] += ev.device_time / 1e3 / repeats  # ms per step
            kernels[ev.name][1] += 1
    replay_ms = graph_replay_ms(g, batch) if batch in g.graphs else None
    g.seq_lens.zero_()
    groups: dict[str, float] = {}
    count = 0
    for name, (ms, n) in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
        count += n
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(batch=batch, ctx=ctx, total_ms=sum(groups.values()), kernels_per_step=count / repeats,
                graph_replay_ms=replay_ms,
                groups_ms=dict(sorted(groups.items(), key=lambda kv: -kv[1])),
                top=[dict(name=n[:90], ms=v[0], launches=v[1] / repeats) for n, v in top])


def graph_replay_ms(g, batch: int, repeats: int = 50) -> float:
    """Wall time of one replay of the captured decode graph of this batch size (the model's
    forward only), from CUDA events around back-to-back replays: what a step costs with the
    launch gaps included, to set beside the kernels' summed GPU time."""
    graph = g.graphs[batch]
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b", choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64, 14])
    ap.add_argument("--ctx", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unfused", action="store_true", help="the layers' small ops as torch ops")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()
    cfg = CONFIGS[args.model]
    path = write_config(args.model, cfg, Path(tempfile.mkdtemp(prefix="tidal-kernels-")))
    llm = LLM(path, load_format="dummy", device="cuda", block_size=256, max_num_seqs=max(args.batch),
              max_num_batched_tokens=16384, max_model_len=4096, gpu_memory_utilization=0.9, seed=0,
              fused_kernels="off" if args.unfused else "auto")
    bw = copy_bandwidth(torch.device("cuda"))
    w_bytes, kv_tok = model_bytes(cfg)
    rows = []
    for b in args.batch:
        r = profile_step(llm, b, args.ctx, args.repeats)
        r["floor_ms"] = dict(weights=1e3 * w_bytes / bw, kv=1e3 * kv_tok * b * (args.ctx + 1) / bw)
        rows.append(r)
        print(f"\n{args.model} B={b} ctx={args.ctx}: {r['total_ms']:.2f} ms GPU per step, "
              f"{r['kernels_per_step']:.0f} kernels; floors: weights {r['floor_ms']['weights']:.2f} ms, "
              f"KV {r['floor_ms']['kv']:.2f} ms; graph replay (forward only) "
              f"{r['graph_replay_ms'] if r['graph_replay_ms'] is not None else float('nan'):.3f} ms")
        for grp, ms in r["groups_ms"].items():
            print(f"  {grp:14s} {ms:7.3f} ms")
        for k in r["top"][:10]:
            print(f"    {k['ms']:7.3f} ms  x{k['launches']:5.0f}  {k['name']}")
    llm.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(dict(model=args.model, unfused=args.unfused, device=torch.cuda.get_device_name(),
                                                  copy_bandwidth_bytes_s=bw, rows=rows), indent=1))


if __name__ == "__main__":
    main()
