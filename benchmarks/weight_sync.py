"""Weight sync benchmark: tidal.sync.WeightSender pushing into a running `tidal serve`, against a
raw torch.distributed broadcast of the same bytes in the same run, and the generation stall.

  python benchmarks/weight_sync.py                                  # CPU, gloo: tiny + qwen2.5-0.5b shapes
  python benchmarks/weight_sync.py --shapes tiny --backend shm
  python benchmarks/weight_sync.py --device cuda --backend ipc --shapes qwen3-0.6b qwen2.5-7b   # colocated GPU

On a GPU with `--backend ipc` the trainer's tensors live on the same GPU as the engine and the
baseline is a device-to-device copy of the same bytes (what an ideal colocated push costs).

For each shape (random weights, load_format=dummy): one warm-up push, then --repeats measured
pushes (median, min-max) and the phases of the median one (pack, wire, stage, commit); the raw
broadcast time of the same byte count (rank 0 here, rank 1 a helper process, same gloo
transport, into a buffer already touched: the median of the warm repeats; the first, cold one
is recorded too), their ratio; and the stall: a greedy request streams tokens through the pushes
with no pause, and the longest gap between two of its tokens during a push is compared with its
median gap before the pushes (one decode step), with and without the engine's commit copy, and
the time an n-token prefill takes on the idle engine (n: the request's length at the last push),
which is what recomputing its KV under the new weights costs. Two more pushes with nothing
generating give the push time without decode steps competing for the cores (idle s). The raw
broadcast is measured twice: with the engine idle (after it stopped) and while the same greedy
request streams (raw dec s), so push-while-decoding compares with raw-while-decoding. copy s is
what a copy commit of the same tensors into a float32 model costs (the commit before the CPU swap
commit; CUDA still copies), measured in this process. Prints a
table and writes weight_sync_cpu.json into benchmarks/results/local/ (--publish:
benchmarks/results/; --out: any path).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402
from benchmarks.throughput import CONFIGS, TINY, write_config  # noqa: E402
from tidal.sync import WeightSender  # noqa: E402

SHAPES = {"tiny": TINY, "qwen2.5-0.5b": CONFIGS["qwen2.5-0.5b"], "qwen3-0.6b": CONFIGS["qwen3-0.6b"],
          "qwen2.5-7b": CONFIGS["qwen2.5-7b"]}

RAW_RECEIVER = r"""
import sys, torch, torch.distributed as dist
from tidal.engine.weight_transfer import destroy_group, join_group
port, nbytes, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = join_group("127.0.0.1", port, 1, 2, "raw-bench", "gloo", 300)
buf = torch.empty(nbytes, dtype=torch.uint8)
for _ in range(reps):
    dist.broadcast(torch.empty(1), 0, group=g.pg)
    dist.broadcast(buf, 0, group=g.pg)
    dist.broadcast(torch.empty(1), 0, group=g.pg)
destroy_group(g)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_ARGS: list[str] = []  # --serve-arg


def start_server(path: str, port: int, device: str = "cpu", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tidal.cli", "serve", path, "--port", str(port), "--load-format", "dummy",
           "--max-num-seqs", "8", "--log-level", "warning", *extra]
    cmd += ["--kv-cache-memory-gb", "0.5"] if device == "cpu" else ["--gpu-memory-utilization", "0.4"]
    log = tempfile.NamedTemporaryFile("w+", prefix="tidal-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"tidal serve exited with {proc.returncode}: {log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("tidal serve did not become healthy")


def raw_broadcast_s(nbytes: int, reps: int = 3) -> list[float]:
    """gloo broadcasts of nbytes to a helper process into the same buffer, `reps` times: the
    first touches fresh pages on both sides (cold), the later ones are the warm baseline."""
    import torch.distributed as dist

    from tidal.engine.weight_transfer import destroy_group, join_group
    port = free_port()
    helper = subprocess.Popen([sys.executable, "-c", RAW_RECEIVER, str(port), str(nbytes), str(reps)])
    g = join_group("127.0.0.1", port, 0, 2, "raw-bench", "gloo", 300)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps):
        dist.broadcast(torch.zeros(1), 0, group=g.pg)
        t0 = time.perf_counter()
        dist.broadcast(buf, 0, group=g.pg)
        dist.broadcast(torch.zeros(1), 0, group=g.pg)   # returns once the receiver has the bytes
        times.append(time.perf_counter() - t0)
    helper.wait(120)
    destroy_group(g)
    return times


def d2d_copy_s(nbytes: int) -> float:
    """A device-to-device copy of nbytes (median of 5), the floor of a colocated push."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(times)


def stream_gaps(url: str, into: dict, started: threading.Event, prompt: list[int] | None = None) -> None:
    body = {"input_ids": prompt or [5, 6, 7, 8], "stream": True, "incremental_streaming_output": True,
            "sampling_params": {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}}
    stamps = into.setdefault("stamps", [])
    with httpx.stream("POST", url + "/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                stamps.extend([time.perf_counter()] * max(1, len(ev["output_ids"])))
                if len(stamps) > 20:
                    started.set()
                if into.get("stop") or ev.get("finish_reason"):
                    break


def state_dict(path: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the checkpoint (HF) names of the model at `path`, as a trainer has them."""
    from tidal.models.config import read_hf_config
    from tidal.models.registry import get_model_class
    cfg, gen = read_hf_config(path)
    cls = get_model_class(cfg)
    with torch.device("meta"):
        model = cls(cls.arch_from_config(cfg, gen), dtype)
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * 0.02).to(dtype)
            for name, (shape, _) in model.weight_specs().items() if name not in model.optional_weights()}


def wait_tokens(stamps: list[float], after: float, n: int, timeout: float = 120) -> None:
    """Until n tokens have streamed after `after` (steady decode between two pushes)."""
    deadline = time.monotonic() + timeout
    while sum(1 for t in stamps if t > after) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def bench(shape: str, backend: str, bucket_bytes: int, dtype: torch.dtype, root: Path, device: str = "cpu",
          repeats: int = 3, streams: int = 1) -> dict:
    cfg = SHAPES[shape]
    path = write_config(shape, cfg, root)
    port = free_port()
    server = start_server(path, port, device, tuple(SERVE_ARGS))
    url = f"http://127.0.0.1:{port}"
    try:
        tensors = {n: t.to(device) for n, t in state_dict(path, dtype, 1).items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with WeightSender([url], backend=backend, bucket_bytes=bucket_bytes, timeout_s=300) as sender:
            warm = sender.push(tensors, 1)   # joins the group; the pushes after it are the measured ones
            assert warm.ok, warm.replicas
            all_gaps: list[dict] = [{} for _ in range(streams)]
            events = [threading.Event() for _ in range(streams)]
            threads = [threading.Thread(target=stream_gaps, args=(url, g, e, [5 + i, 6, 7, 8 + i]), daemon=True)
                       for i, (g, e) in enumerate(zip(all_gaps, events))]
            for th in threads:
                th.start()
            for e in events:
                e.wait(120)
            gaps = all_gaps[0]
            stamps = gaps["stamps"]
            wait_tokens(stamps, time.perf_counter(), 5)   # a steady decode before the pushes
            pushes = []
            for i in range(repeats):
                t_push0 = time.perf_counter()
                res = sender.push(tensors, 2 + i)
                t_push1 = time.perf_counter()
                assert res.ok, res.replicas
                pushes.append((t_push0, t_push1, res))
                wait_tokens(stamps, t_push1, 5)
            # the raw broadcast under the same streaming load as the pushes
            raw_busy_times = raw_broadcast_s(nbytes) if device == "cpu" else None
            for g in all_gaps:
                g["stop"] = True
            for th in threads:
                th.join(60)
            idle = [sender.push(tensors, 2 + repeats + i) for i in range(2)]   # nothing generating
            assert all(r.ok for r in idle), [r.replicas for r in idle]
        steady = [b - a for a, b in zip(stamps, stamps[1:]) if b < pushes[0][0] and b > a]
        copy_commit = copy_commit_s(path, tensors) if device == "cpu" else None
        step = statistics.median(steady) if steady else float("nan")
        runs = [max((measure_push(g["stamps"], t0, t1, res, url, step) for g in all_gaps), key=lambda r: r["stall_s"])
                for t0, t1, res in pushes]   # the stream that waited longest
        prefill = prefill_s(url, runs[-1]["tokens_before"] + 4)
    finally:
        server.terminate()
        server.wait(60)
    del tensors
    if device == "cuda" and backend == "ipc":
        raw, raw_cold = d2d_copy_s(nbytes), None
    else:
        times = raw_broadcast_s(nbytes)
        raw, raw_cold = statistics.median(times[1:]), times[0]
    push = statistics.median(r["push_s"] for r in runs)
    mid = sorted(runs, key=lambda r: r["push_s"])[len(runs) // 2]
    idle_best = min(idle, key=lambda r: r.phases["total"])
    return {"shape": shape, "device": device, "streams": streams, "serve_args": SERVE_ARGS,
            "baseline": "d2d_copy" if raw_cold is None else "gloo_broadcast_warm",
            "backend": backend, "dtype": str(dtype), "bytes": nbytes, "bucket_bytes": bucket_bytes,
            "push_s": push, "push_min_s": min(r["push_s"] for r in runs), "push_max_s": max(r["push_s"] for r in runs),
            "phases": mid["phases"], "raw_broadcast_s": raw, "raw_broadcast_cold_s": raw_cold,
            "ratio": push / raw, "push_idle_s": idle_best.phases["total"],
            "raw_broadcast_decoding_s": None if raw_busy_times is None else statistics.median(raw_busy_times[1:]),
            "ratio_decoding": None if raw_busy_times is None else push / statistics.median(raw_busy_times[1:]),
            "copy_commit_s": copy_commit,
            "ratio_idle": idle_best.phases["total"] / raw, "idle_phases": idle_best.phases,
            "decode_step_s": step,
            "stall_s": max(r["stall_s"] for r in runs), "stall_steps": max(r["stall_steps"] or 0 for r in runs),
            "engine_commit_s": mid["engine_commit_s"],
            "stall_excess_steps": max(r["stall_excess_steps"] or 0 for r in runs),
            "recompute_prefill_s": prefill, "runs": runs}


def copy_commit_s(path: str, tensors: dict[str, torch.Tensor]) -> float:
    """What the copy commit costs (the commit before the swap one, still used on CUDA): the same
    tensors copied and cast into a float32 model of the same shape, in this process, median of
    2 after a first copy that touches the parameters' pages."""
    from tidal.models.config import read_hf_config
    from tidal.models.registry import get_model_class
    cfg, gen = read_hf_config(path)
    cls = get_model_class(cfg)
    model = cls(cls.arch_from_config(cfg, gen), torch.float32)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.load_weights(tensors.items())
        times.append(time.perf_counter() - t0)
    del model
    return statistics.median(times[1:])


def prefill_s(url: str, n: int) -> float:
    """Time to the first token of an n-token prompt on the idle engine: what recomputing the KV
    of a request that long costs after a commit."""
    body = {"input_ids": [5 + i % 100 for i in range(n)], "sampling_params": {"max_tokens": 1, "temperature": 0}}
    t0 = time.perf_counter()
    httpx.post(url + "/generate", json=body, timeout=300).raise_for_status()
    return time.perf_counter() - t0


def measure_push(stamps: list[float], t0: float, t1: float, res, url: str, step: float) -> dict:
    """The longest inter-token gap overlapping one push, in seconds and in decode steps, and
    what is left of it once the engine's commit copy is taken out."""
    during = [b - a for a, b in zip(stamps, stamps[1:]) if a <= t1 and b >= t0 and b > a]
    stall = max(during) if during else 0.0
    commit = res.replicas[url].get("commit_s", 0.0)
    ok = step == step and step > 0
    at = max(((a, b) for a, b in zip(stamps, stamps[1:]) if a <= t1 and b >= t0 and b > a),
             key=lambda g: g[1] - g[0], default=(t0, t0))
    return {"push_s": res.phases["total"], "phases": res.phases, "stall_s": stall, "engine_commit_s": commit,
            "stall_from_to_s": [at[0] - t0, at[1] - t0], "push_end_s": t1 - t0,
            "gaps_during_ms": [round((b - a) * 1e3, 1) for a, b in zip(stamps, stamps[1:]) if a <= t1 and b >= t0],
            "recomputed": res.replicas[url].get("recomputed"), "refreshed": res.replicas[url].get("refreshed"),
            "kv_refresh": res.replicas[url].get("kv_refresh"), "tokens_before": sum(1 for s in stamps if s < t0),
            "stall_steps": stall / step if ok else None,
            "stall_excess_steps": (stall - commit) / step if ok else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "qwen2.5-0.5b"], choices=list(SHAPES))
    ap.add_argument("--backend", default="gloo", choices=["gloo", "shm", "ipc", "nccl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the trainer's tensor dtype (the CPU engine serves float32 and casts at commit)")
    ap.add_argument("--repeats", type=int, default=3, help="measured pushes per shape (after one warm-up push)")
    ap.add_argument("--streams", type=int, default=1, help="greedy requests streaming through the pushes (<= 8); "
                    "the stall is the longest gap of any of them")
    ap.add_argument("--out", default=None, help="default: weight_sync_cpu.json in the results dir")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra `tidal serve` argument (repeatable), e.g. --serve-arg=--no-cpu-prepack-weights")
    add_publish_flag(ap)
    args = ap.parse_args()
    SERVE_ARGS.extend(args.serve_arg)
    args.out = args.out or str(results_dir(args.publish) / "weight_sync_cpu.json")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for shape in args.shapes:
            rows.append(bench(shape, args.backend, args.bucket_mb << 20, getattr(torch, args.dtype), Path(d),
                              args.device, args.repeats, args.streams))
    print(f"{'shape':14} {'MB':>8} {'push s':>8} {'min-max':>13} {'pack':>7} {'wire':>7} {'stage':>7} "
          f"{'commit':>7} {'raw s':>8} {'ratio':>6} {'idle s':>7} {'ratio':>6} {'step ms':>8} {'stall ms':>9} "
          f"{'stall/step':>10} {'(-commit)':>9} {'recompute s':>11} {'raw dec s':>9} {'ratio':>6} {'copy s':>7} "
          f"{'refr/recomp':>11}")
    for r in rows:
        p = r["phases"]
        print(f"{r['shape']:14} {r['bytes'] / 2**20:8.1f} {r['push_s']:8.3f} "
              f"{r['push_min_s']:6.3f}-{r['push_max_s']:<6.3f} {p['pack']:7.3f} {p['wire']:7.3f} "
              f"{p['stage']:7.3f} {p['commit']:7.3f} {r['raw_broadcast_s']:8.3f} {r['ratio']:6.2f} "
              f"{r['push_idle_s']:7.3f} {r['ratio_idle']:6.2f} "
              f"{r['decode_step_s'] * 1e3:8.2f} {r['stall_s'] * 1e3:9.1f} {r['stall_steps'] or 0:10.1f} "
              f"{r['stall_excess_steps'] or 0:9.1f} {r['recompute_prefill_s']:11.3f} "
              f"{r['raw_broadcast_decoding_s'] or 0:9.3f} {r['ratio_decoding'] or 0:6.2f} "
              f"{r['copy_commit_s'] or 0:7.3f} "
              f"{max(x['refreshed'] or 0 for x in r['runs']):>5}/{max(x['recomputed'] or 0 for x in r['runs']):<5}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
