"""Serving benchmark: `tidal serve` under concurrent streaming load vs the offline engine.

    python benchmarks/serving.py --model MODEL_DIR --num-prompts 1024 --concurrency 256 \
        --input-len 256 --output-len 256 --device cuda --load-format dummy

1. Offline: `LLM.generate` on the workload (max_num_seqs = --concurrency), output tokens/s.
2. Server: starts `tidal serve` (a subprocess, 127.0.0.1, a free port) with the same engine
   settings, then keeps --concurrency streaming /v1/completions requests in flight until
   --num-prompts are done. Measures throughput, TTFT, inter-token latency (per token, between
   streamed chunks) and end-to-end latency on the client side.
3. Overhead = 1 - server tokens/s / offline tokens/s (goal: < 10% at 256 streams on a GPU).

Every request has a fixed length (random token-id prompts, ignore_eos), so both runs do the same
work. The load generator is a minimal asyncio HTTP/1.1 client (no third-party client in the
measured path). Prints a table and writes JSON (default benchmarks/results/serving.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)   # per token
    tokens: int = 0
    error: str | None = None


# -- workload --------------------------------------------------------------------------------
def make_workload(vocab_size: int, num: int, input_len: int, output_len: int, spread: float,
                  seed: int) -> tuple[list[list[int]], list[int]]:
    """Random token-id prompts and per-request output lengths, uniform in
    output_len * [1 - spread, 1 + spread] (the same for the offline and the server run)."""
    rng = random.Random(seed)
    hi = min(vocab_size, 50_000) - 1
    prompts = [[rng.randint(10, hi) for _ in range(input_len)] for _ in range(num)]
    lo, up = max(1, round(output_len * (1 - spread))), max(1, round(output_len * (1 + spread)))
    return prompts, [rng.randint(lo, up) for _ in range(num)]


def model_vocab(model_path: str) -> int:
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    return int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"))


def engine_kwargs(args) -> dict:
    kw = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens, load_format=args.load_format,
              block_size=args.block_size)
    if args.num_kv_blocks:
        kw["num_kv_blocks"] = args.num_kv_blocks
    if args.enforce_eager:
        kw["enforce_eager"] = True
    return kw


def serve_args(kw: dict) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not None and v is not False:
            out += [flag, str(v)]
    return out


# -- offline ---------------------------------------------------------------------------------
def run_offline(model: str, prompts: list[list[int]], lengths: list[int], args) -> dict:
    from tidal import LLM, SamplingParams
    llm = LLM(model, **engine_kwargs(args))
    try:
        sps = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        llm.generate(prompts[:8], sps[:8], use_tqdm=False)      # warm up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        dt = time.perf_counter() - t0
    finally:
        llm.shutdown()
        del llm
        _free_gpu()
    toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"duration_s": dt, "output_tokens": toks, "output_tok_s": toks / dt, "requests_s": len(prompts) / dt}


def _free_gpu() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# -- server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args, port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tidal.cli", "serve", model, "--port", str(port), "--log-level", "warning",
           *serve_args(engine_kwargs(args))]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tidal serve exited with {proc.returncode}; see {log_path}")
        try:
            status, _ = asyncio.run(_get("127.0.0.1", port, "/health"))
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"tidal serve did not become healthy in {args.startup_timeout}s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[j + 2:j + 2 + size])
        i = j + 2 + size + 2


_decode_event = msgspec.json.Decoder().decode


async def stream_request(host: str, port: int, body: bytes) -> RequestResult:
    """One streaming /v1/completions request over a raw HTTP/1.1 connection."""
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        res.error = f"connect: {e}"
        return res
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            res.error = f"HTTP {status}: {(await reader.read())[:300]!r}"
            return res
        buf = b""
        last = None
        done = False
        while not done:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]   # chunk data + CRLF
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: "):
                    continue
                payload = ev[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                msg = _decode_event(payload)
                if "error" in msg:
                    res.error = str(msg["error"])
                    return res
                n = sum(len(c.get("token_ids") or ()) for c in msg["choices"])
                if n:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.extend([(now - last) / n] * n)
                    last = now
                    res.tokens += n
        res.e2e = time.perf_counter() - t0
        res.ok = True
        return res
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        writer.close()


async def run_load(port: int, prompts: list[list[int]], lengths: list[int], args) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(args.concurrency)
    enc = msgspec.json.Encoder()

    async def one(p: list[int], n: int) -> RequestResult:
        body = enc.encode({"prompt": p, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                           "stream": True, "return_token_ids": True})
        async with sem:
            return await stream_request("127.0.0.1", port, body)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(p, n) for p, n in zip(prompts, lengths)])
    return list(results), time.perf_counter() - t0


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    toks = sum(r.tokens for r in ok)
    ttft = sorted(r.ttft for r in ok)
    itl = sorted(x for r in ok for x in r.itls)
    e2e = sorted(r.e2e for r in ok)
    return {"duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:5],
            "output_tokens": toks, "output_tok_s": toks / duration if duration else 0.0,
            "requests_s": len(ok) / duration if duration else 0.0,
            "ttft_ms": _pcts(ttft), "itl_ms": _pcts(itl), "e2e_ms": _pcts(e2e)}


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3  # noqa: E731
    return {"mean": statistics.fmean(xs) * 1e3, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def scrape_metrics(port: int) -> dict:
    try:
        status, body = asyncio.run(_get("127.0.0.1", port, "/metrics"))
    except OSError:
        return {}
    vals: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("tidal_engine_step_seconds_sum") or line.startswith("tidal_engine_step_seconds_count"):
            name, v = line.split(" ")
            vals[name.split("{")[0]] = float(v)
    if vals.get("tidal_engine_step_seconds_count"):
        return {"engine_steps": vals["tidal_engine_step_seconds_count"],
                "engine_step_ms_mean": 1e3 * vals["tidal_engine_step_seconds_sum"] / vals["tidal_engine_step_seconds_count"]}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF-format model directory (default: the embedded tiny model)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64, help="streams in flight (also the engine's max_num_seqs)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--output-len-spread", type=float, default=0.5,
                    help="output lengths are uniform in output_len * [1 - s, 1 + s] (0: all equal)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-offline", action="store_true", help="only measure the server")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serving.json"))
    args = ap.parse_args()

    from tidal.engine.core import resolve_model_path
    model = resolve_model_path(args.model)
    prompts, lengths = make_workload(model_vocab(model), args.num_prompts, args.input_len, args.output_len,
                                     args.output_len_spread, args.seed)
    device = _device_name(args.device)
    print(f"model {model} | device {device} | {args.num_prompts} prompts x {args.input_len} in / "
          f"{args.output_len} out | concurrency {args.concurrency}", flush=True)

    offline = None
    if not args.skip_offline:
        offline = run_offline(model, prompts, lengths, args)
        print(f"offline: {offline['output_tok_s']:.1f} output tok/s in {offline['duration_s']:.1f}s", flush=True)

    port = free_port()
    log_path = os.path.join(ROOT, "benchmarks", "results", "serving_server.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    proc = start_server(model, args, port, log_path)
    try:
        asyncio.run(run_load(port, prompts[:8], lengths[:8], args))            # warm up
        engine_pid = json.loads(asyncio.run(_get("127.0.0.1", port, "/health"))[1])["engine_pid"]
        cpu0 = {"api_server": _cpu_s(proc.pid), "engine": _cpu_s(engine_pid), "load_client": _cpu_s(os.getpid())}
        results, duration = asyncio.run(run_load(port, prompts, lengths, args))
        cpu1 = {"api_server": _cpu_s(proc.pid), "engine": _cpu_s(engine_pid), "load_client": _cpu_s(os.getpid())}
        server = summarize(results, duration)
        server.update(scrape_metrics(port))
        # CPU seconds per wall second of each process: an API server near 1.0 is saturated.
        server["cpu_utilization"] = {k: (cpu1[k] - cpu0[k]) / duration for k in cpu0}
    finally:
        stop_server(proc)

    overhead = None if offline is None else 1.0 - server["output_tok_s"] / offline["output_tok_s"]
    report = {"benchmark": "serving", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device,
              "host": platform.node(), "model": model,
              "workload": {"num_prompts": args.num_prompts, "concurrency": args.concurrency,
                           "input_len": args.input_len, "output_len": args.output_len,
                           "output_len_spread": args.output_len_spread, "load_format": args.load_format,
                           "engine": engine_kwargs(args)},
              "offline": offline, "server": server, "server_overhead": overhead}
    _print_table(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _device_name(device: str) -> str:
    try:
        import torch
        if device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _print_table(r: dict) -> None:
    s, o = r["server"], r["offline"]
    rows = [("output tok/s", f"{o['output_tok_s']:.1f}" if o else "-", f"{s['output_tok_s']:.1f}"),
            ("requests/s", f"{o['requests_s']:.2f}" if o else "-", f"{s['requests_s']:.2f}"),
            ("duration s", f"{o['duration_s']:.2f}" if o else "-", f"{s['duration_s']:.2f}")]
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = s.get(name) or {}
        if p:
            rows.append((f"{name[:-3]} p50/p90/p99 ms", "-", f"{p['p50']:.1f} / {p['p90']:.1f} / {p['p99']:.1f}"))
    if "engine_step_ms_mean" in s:
        rows.append(("engine step mean ms", "-", f"{s['engine_step_ms_mean']:.2f}"))
    rows.append(("completed / failed", "-", f"{s['completed']} / {s['failed']}"))
    cpu = s.get("cpu_utilization") or {}
    if cpu:
        rows.append(("cpu api/engine/client", "-", " / ".join(f"{cpu[k]:.2f}" for k in ("api_server", "engine", "load_client"))))
    w = max(len(a) for a, _, _ in rows)
    print(f"\n{'':<{w}}  {'offline':>14}  {'server':>24}")
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>14}  {c:>24}")
    if r["server_overhead"] is not None:
        print(f"\nserver overhead vs offline: {100 * r['server_overhead']:.1f}% (goal < 10% at 256 streams on GPU)")
    if s["errors"]:
        print("errors:", s["errors"])


if __name__ == "__main__":
    main()
