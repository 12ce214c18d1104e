"""Control-plane benchmark: pause latency per mode with N requests in flight, update_weights
time against bytes moved (and a device copy of the same bytes), sleep/wake times and bytes freed.

  python benchmarks/control.py                       # CPU, tiny model
  python benchmarks/control.py --device cuda --shapes qwen2.5-0.5b qwen3-0.6b   # GPU, dummy weights
Prints a table and writes control_<device>.json into benchmarks/results/local/
(--publish: benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402
from benchmarks.throughput import CONFIGS, TINY, write_config  # noqa: E402
from tidal import LLM, SamplingParams  # noqa: E402


def wait_running(llm: LLM, n: int, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while llm.state()["num_running"] < n or llm.state()["step_count"] < 3:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"never reached {n} running requests")
        time.sleep(0.002)


def pause_latency(llm: LLM, mode: str, inflight: int, vocab: int) -> dict:
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % vocab for j in range(32)] for i in range(inflight)]
    t = threading.Thread(target=llm.generate, args=(prompts, params), kwargs=dict(use_tqdm=False), daemon=True)
    t.start()
    wait_running(llm, min(inflight, llm.config.max_num_seqs))
    step = llm.state()["last_step_time_s"]
    t0 = time.perf_counter()
    res = llm.pause(mode, timeout_s=0.0 if mode == "drain" else None)
    elapsed = time.perf_counter() - t0
    if mode != "abort":
        llm.pause("abort")
    llm.resume()
    t.join(60)
    return {"mode": mode, "inflight": inflight, "pause_s": elapsed, "decode_step_s": step,
            "engine_elapsed_s": res["elapsed_s"]}


def bench_shape(name: str, cfg: dict, device: str, inflights: list[int], root: Path) -> dict:
    path = write_config(name, cfg, root)
    llm = LLM(path, load_format="dummy", device=device, max_num_seqs=max(inflights), block_size=16,
              max_num_batched_tokens=8192, kv_cache_memory_gb=2.0,
              num_kv_blocks=4096 if device.startswith("cuda") else None)
    vocab = cfg["vocab_size"]
    out: dict = {"shape": name, "device": device, "pause": [], "update": {}, "sleep": {}}
    for n in inflights:
        for mode in ("abort", "retract", "keep", "drain"):
            out["pause"].append(pause_latency(llm, mode, n, vocab))
    # update_weights from named tensors already on the device vs a plain device copy of the same bytes
    model = llm.engine.core.runner.model
    named = {n: p.detach().clone() for n, p in _hf_named(model).items()}
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    t0 = time.perf_counter()
    res = llm.update_weights(named_tensors=named, version=1)
    upd = time.perf_counter() - t0
    dst = {n: torch.empty_like(t) for n, t in named.items()}
    _sync(device)
    t0 = time.perf_counter()
    for n, t in named.items():
        dst[n].copy_(t)
    _sync(device)
    copy = time.perf_counter() - t0
    out["update"] = {"bytes": nbytes, "update_s": upd, "copy_s": copy, "ratio": upd / copy,
                     "stage_s": res["stage_s"], "commit_s": res["commit_s"]}
    llm.pause("abort")
    t0 = time.perf_counter()
    s = llm.sleep(["kv_cache", "weights"])
    sleep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.wake_up()
    wake_s = time.perf_counter() - t0
    total = torch.cuda.memory_reserved() if device.startswith("cuda") else None
    out["sleep"] = {"sleep_s": sleep_s, "wake_s": wake_s, "bytes_freed": s["bytes_freed"],
                    "reserved_after_wake": total}
    llm.shutdown()
    return out


def _hf_named(model) -> dict[str, torch.Tensor]:
    """Named tensors in checkpoint layout, built from the model's own specs (random values)."""
    specs = model.weight_specs()
    dev = next(model.parameters()).device
    return {n: torch.randn(shape, device=dev).to(dtype) * 0.02 for n, (shape, dtype) in specs.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="*", default=None, help=f"of {list(CONFIGS)}; default: tiny on CPU")
    ap.add_argument("--inflight", nargs="*", type=int, default=[8, 64, 256])
    ap.add_argument("--out", default=None)
    add_publish_flag(ap)
    args = ap.parse_args()
    shapes = {n: CONFIGS[n] for n in args.shapes} if args.shapes else {"tiny": dict(TINY, torch_dtype="float32")}
    root = Path(tempfile.mkdtemp(prefix="tidal-control-"))
    results = [bench_shape(n, c, args.device, args.inflight, root) for n, c in shapes.items()]
    print(f"{'shape':14} {'mode':8} {'inflight':>8} {'pause ms':>9} {'step ms':>8}")
    for r in results:
        for p in r["pause"]:
            print(f"{r['shape']:14} {p['mode']:8} {p['inflight']:8d} {p['pause_s'] * 1e3:9.2f} {p['decode_step_s'] * 1e3:8.2f}")
        u, s = r["update"], r["sleep"]
        print(f"{r['shape']}: update_weights {u['bytes'] / 2**20:.1f} MiB in {u['update_s'] * 1e3:.1f} ms "
              f"(device copy {u['copy_s'] * 1e3:.1f} ms, ratio {u['ratio']:.2f}); sleep {s['sleep_s'] * 1e3:.1f} ms "
              f"freed {s['bytes_freed']}, wake {s['wake_s'] * 1e3:.1f} ms")
    out = Path(args.out or results_dir(args.publish) / f"control_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
