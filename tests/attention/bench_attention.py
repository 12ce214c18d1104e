"""Microbenchmark of the Triton attention kernels (run on the device; not a test).

    PYTHONUNBUFFERED=1 python tests/attention/bench_attention.py --out results.json

Decode: B=256, ctx ~1k, Qwen3-0.6B attention (16 q heads, 8 kv heads, head_dim 128), over
block sizes and kernel configs, against the bytes it must read and the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from tests.attention.paged_batch import make_paged_batch  # noqa: E402
from tidal.attention.base import store_kv  # noqa: E402
from tidal.kernels.paged_decode import default_num_splits, paged_decode  # noqa: E402
from tidal.kernels.paged_prefill import paged_prefill  # noqa: E402


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def decode_batch(bs, ctx, hq, hkv, d, block_size, jitter):
    rng = random.Random(0)
    ctxs = [max(0, ctx + rng.randint(-jitter, jitter)) for _ in range(bs)]
    b = make_paged_batch(ctxs, [1] * bs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         block_size=block_size, dtype=torch.bfloat16)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    kv_bytes = sum(c + 1 for c in ctxs) * hkv * d * 2 * 2
    return b, kv_bytes + 2 * b.q.numel() * 2


def bench_decode(bw, rows, bs, ctx, hq, hkv, d, block_sizes, configs, jitter=64, label=""):
    for block_size in block_sizes:
        b, nbytes = decode_batch(bs, ctx, hq, hkv, d, block_size, jitter)
        default = default_num_splits(bs, hkv, b.meta.max_seq_len, b.q.device)
        out = torch.empty_like(b.q)
        for block_n, warps, stages, splits in configs:
            splits = default if splits == "auto" else splits
            fn = lambda: paged_decode(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, d ** -0.5,  # noqa: E731
                                      out=out, num_splits=splits, block_n=block_n, num_warps=warps,
                                      num_stages=stages)
            try:
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  skip {block_size=} {block_n=} {warps=} {stages=}: {type(e).__name__}: {e}"[:200])
                continue
            row = dict(kind="decode", label=label, bs=bs, ctx=ctx, hq=hq, hkv=hkv, d=d, block_size=block_size,
                       block_n=block_n, warps=warps, stages=stages, splits=splits, us=ms * 1e3,
                       gbps=nbytes / (ms * 1e-3) / 1e9, frac_bw=nbytes / (ms * 1e-3) / bw)
            rows.append(row)
            print(f"  decode {label:8s} bs={bs:4d} ctx={ctx:6d} bsz={block_size:4d} bn={block_n:4d} w={warps} "
                  f"st={stages} sp={splits:2d}: {ms * 1e3:8.1f} us  {row['gbps']:7.0f} GB/s  "
                  f"{100 * row['frac_bw']:5.1f}% of copy bw")


def bench_prefill(rows, n_seqs, q_len, hq, hkv, d, block_size, configs):
    b = make_paged_batch([0] * n_seqs, [q_len] * n_seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         block_size=block_size, dtype=torch.bfloat16)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    flops = 4 * n_seqs * hq * d * q_len * (q_len + 1) / 2
    q4 = b.q.view(n_seqs, q_len, hq, d).transpose(1, 2)
    k4 = b.k.view(n_seqs, q_len, hkv, d).transpose(1, 2)
    v4 = b.v.view(n_seqs, q_len, hkv, d).transpose(1, 2)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)  # noqa: E731
    ms = do_bench(sdpa, warmup=25, rep=100, return_mode="median")
    rows.append(dict(kind="prefill", impl="torch_sdpa", n_seqs=n_seqs, q_len=q_len, us=ms * 1e3,
                     tflops=flops / (ms * 1e-3) / 1e12))
    print(f"  prefill sdpa (contiguous, no paging) {n_seqs}x{q_len}: {ms * 1e3:8.1f} us {rows[-1]['tflops']:6.1f} TFLOP/s")
    out = torch.empty_like(b.q)
    for block_m, block_n, warps, stages in configs:
        fn = lambda: paged_prefill(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens,  # noqa: E731
                                   b.meta.query_start_loc, q_len, d ** -0.5, out=out, block_m=block_m,
                                   block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(f"  skip prefill {block_m=} {block_n=} {warps=} {stages=}: {type(e).__name__}"[:200])
            continue
        rows.append(dict(kind="prefill", impl="triton_paged", n_seqs=n_seqs, q_len=q_len, block_size=block_size,
                         block_m=block_m, block_n=block_n, warps=warps, stages=stages, us=ms * 1e3,
                         tflops=flops / (ms * 1e-3) / 1e12))
        print(f"  prefill triton {n_seqs}x{q_len} bsz={block_size} bm={block_m} bn={block_n} w={warps} st={stages}: "
              f"{ms * 1e3:8.1f} us {rows[-1]['tflops']:6.1f} TFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_attention.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows: list[dict] = []
    if args.quick:
        configs = [(64, 4, 2, 1)]
    else:
        configs = list(itertools.product([32, 64, 128], [4, 8], [2, 3], [1])) + [(64, 4, 2, 2), (64, 4, 3, 2)]
    bench_decode(bw, rows, 256, 1024, 16, 8, 128, [16, 256], configs, label="qwen3-0.6b")
    best = min((r for r in rows if r["kind"] == "decode"), key=lambda r: r["us"])
    cfg = [(best["block_n"], best["warps"], best["stages"], "auto")]
    bench_decode(bw, rows, 256, 1024, 28, 4, 128, [best["block_size"]], cfg, label="qwen2.5-7b")
    bench_decode(bw, rows, 256, 1024, 14, 2, 64, [best["block_size"]], cfg, label="qwen2.5-0.5b")
    for bs, ctx in [(1, 1024), (1, 8192), (1, 32768), (16, 4096), (64, 2048)]:
        bench_decode(bw, rows, bs, ctx, 16, 8, 128, [best["block_size"]],
                     [(best["block_n"], best["warps"], best["stages"], s) for s in (1, "auto")],
                     jitter=0, label="qwen3-0.6b")
    pcfg = [(64, 64, 4, 2)] if args.quick else \
        [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2)]
    bench_prefill(rows, 8, 1024, 16, 8, 128, best["block_size"], pcfg)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bw=bw, rows=rows), indent=1))
    print(f"best decode config: block_size={best['block_size']} block_n={best['block_n']} warps={best['warps']} "
          f"stages={best['stages']}: {best['us']:.1f} us, {100 * best['frac_bw']:.1f}% of copy bandwidth")
    print("flash-attn op schema:", torch.ops.aten._flash_attention_forward.default._schema if
          hasattr(torch.ops.aten, "_flash_attention_forward") else "absent")


if __name__ == "__main__":
    main()
