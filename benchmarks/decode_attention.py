"""Paged decode attention on the GPU: every kernel config against the engine's default, per batch size.

Each config runs inside a CUDA graph (`do_bench_cudagraph`), as a decode step does, so small
batches measure the kernel rather than Python's launch overhead. Shapes are the attention of the
Qwen3-0.6B (16 q / 8 kv heads) and Qwen2.5-7B (28 / 4) models, head_dim 128, block size 256, a
context of about `--ctx` tokens per sequence. The default is what `CudaAttention` picks today:
block_n 64, 4 warps, 2 stages, `default_num_splits` for the graph's longest context
(`--max-model-len`). The table gives, per shape and batch, the default's time, the best config's,
and the fraction of the copy bandwidth each reaches.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_h200.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.attention.paged_batch import make_paged_batch  # noqa: E402
from tidal.attention.base import store_kv  # noqa: E402
from tidal.kernels.paged_decode import default_num_splits, paged_decode  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8), "qwen2.5-7b": (28, 4)}


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def timed(b, out, splits: int, block_n: int, warps: int, stages: int) -> float:
    d = b.q.shape[-1]

    def fn():
        paged_decode(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, d ** -0.5, out=out,
                     num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
    fn()
    return do_bench_cudagraph(fn, rep=40, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 128, 256])
    ap.add_argument("--ctx", type=int, default=1000)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    configs = list(itertools.product([32, 64, 128], [4, 8], [2, 3]))
    rows = []
    for shape in args.shapes:
        hq, hkv = SHAPES[shape]
        for bs in args.batch:
            rng = random.Random(bs)
            ctxs = [max(1, args.ctx + rng.randint(-64, 64)) for _ in range(bs)]
            b = make_paged_batch(ctxs, [1] * bs, num_q_heads=hq, num_kv_heads=hkv, head_dim=128,
                                 block_size=256, dtype=torch.bfloat16)
            store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
            nbytes = sum(c + 1 for c in ctxs) * hkv * 128 * 2 * 2
            out = torch.empty_like(b.q)
            default_splits = default_num_splits(bs, hkv, args.max_model_len, b.q.device)
            default_ms = timed(b, out, default_splits, 64, 4, 2)
            results = []
            for (block_n, warps, stages), splits in itertools.product(configs, [1, 2, 4, 8, 16]):
                try:
                    ms = timed(b, out, splits, block_n, warps, stages)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  skip {shape} bs={bs} {block_n=} {warps=} {stages=} {splits=}: {type(e).__name__}"[:160])
                    continue
                results.append(dict(block_n=block_n, warps=warps, stages=stages, splits=splits, ms=ms))
            best = min(results, key=lambda r: r["ms"])
            row = dict(shape=shape, batch=bs, ctx=args.ctx, bytes=nbytes, default_splits=default_splits,
                       default_ms=default_ms, default_frac_bw=nbytes / (default_ms * 1e-3) / bw,
                       best=best, best_frac_bw=nbytes / (best["ms"] * 1e-3) / bw,
                       top5=sorted(results, key=lambda r: r["ms"])[:5])
            rows.append(row)
            print(f"{shape:11s} bs={bs:4d}: default (sp={default_splits:2d}) {default_ms * 1e3:8.1f} us "
                  f"{100 * row['default_frac_bw']:5.1f}% bw | best bn={best['block_n']} w={best['warps']} "
                  f"st={best['stages']} sp={best['splits']:2d} {best['ms'] * 1e3:8.1f} us "
                  f"{100 * row['best_frac_bw']:5.1f}% bw", flush=True)
            if args.out:  # after every row: a run cut off by its deadline keeps what finished
                Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bw=bw,
                                                          rows=rows), indent=1))


if __name__ == "__main__":
    main()
