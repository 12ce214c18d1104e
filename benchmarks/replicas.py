"""Replicas benchmark: N `tidal serve` replicas through `tidal router` vs the same N hit directly
(router overhead), and 1 vs N replicas (scaling), side by side in one run.

    python benchmarks/replicas.py --replicas 2 --num-prompts 256 --concurrency 128 --device cpu

Phases, on the same replicas and the same workload (random token-id prompts, fixed output
lengths, ignore_eos, greedy, streaming /v1/completions with token ids):
  1. one replica, hit directly                     (the scaling baseline)
  2. N replicas, hit directly, requests round-robin (the overhead baseline)
  3. N replicas through the router                 (least-outstanding routing, the replicas' channels)
  4. with --compare-http: the same through a router with --upstream http (a connection per request)
Overhead = 1 - (3) / (2) output tokens/s (goal < 10% at 128 streams); scaling = (2) / (1) (goal
>= 1.8x for 2 replicas where the machine has the cores: one GPU each). Prints a table and writes
JSON (default benchmarks/results/local/replicas_<device>.json; --publish: results/).

Each phase also records the CPU seconds the replicas (server + engine processes) and the router
used, from /proc: on a host whose cores other tenants share, throughput moves with their load, but
CPU per token does not, and router CPU / replica CPU is what the router costs a CPU-bound host.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402
from benchmarks.serving import (_get, free_port, make_workload, model_vocab, start_server,  # noqa: E402
                                stop_server, stream_request, summarize)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def write_result(result: dict, out: str) -> int:
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


def timed_phase(target: list[int], groups: dict[str, list[int]], prompts, lengths, args) -> dict:
    """One load run against the ports `target`: its summary, plus the CPU seconds (and us per
    output token) each group of processes used meanwhile."""
    before = {k: cpu_seconds(v) for k, v in groups.items()}
    results, duration = asyncio.run(load(target, prompts, lengths, args.concurrency, args.timeout))
    summary = summarize(results, duration)
    summary["cpu_s"] = {k: round(cpu_seconds(v) - before[k], 3) for k, v in groups.items()}
    summary["cpu_us_per_token"] = {k: round(1e6 * v / max(1, summary["output_tokens"]), 1)
                                   for k, v in summary["cpu_s"].items()}
    return summary


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their descendants so far."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for root in pids:
        for p in _tree(root):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def start_router(urls: list[str], port: int, log_path: str, timeout_s: float, root: str = ROOT,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`tidal router` from the tidal package under `root` (--ab: another commit's tree)."""
    cmd = [sys.executable, "-m", "tidal.router.cli", "router", "--port", str(port), "--log-level", "warning", *extra]
    for u in urls:
        cmd += ["--replica", u]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}; see {log_path}")
        try:
            if asyncio.run(_get("127.0.0.1", port, "/health", 5.0))[0] == 200:
                return proc
        except (OSError, asyncio.TimeoutError, ValueError, IndexError):
            pass
        time.sleep(0.25)
    stop_server(proc, 0)
    raise RuntimeError(f"router not healthy in {timeout_s:.0f}s; see {log_path}")


async def load(ports: list[int], prompts, lengths, concurrency: int, timeout_s: float):
    """`concurrency` streams in flight; request i goes to ports[i % len(ports)]."""
    sem = asyncio.Semaphore(concurrency)
    enc = msgspec.json.Encoder()

    async def one(i: int, p: list[int], n: int):
        body = enc.encode({"prompt": p, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                           "stream": True, "return_token_ids": True})
        async with sem:
            return await stream_request("127.0.0.1", ports[i % len(ports)], body)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i, p, n)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    await asyncio.wait(tasks, timeout=timeout_s)
    duration = time.perf_counter() - t0
    for t in tasks:
        t.cancel()
    results = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if not isinstance(r, BaseException)]
    return results, duration


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline of each load phase (s)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"), default=None,
                    help="git commits: routers from each, alternated --pairs times (ABAB) on the same replicas, each "
                         "run a direct phase then a routed one (default JSON name replicas_<device>_ab.json)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--compare-http", action="store_true",
                    help="a fourth phase: a second router with --upstream http (a connection per request)")
    add_publish_flag(ap)
    args = ap.parse_args()
    if args.ab:
        return ab_main(args)
    from tidal.models.tiny import tiny_checkpoint_cached
    model = args.model or tiny_checkpoint_cached("llama")
    prompts, lengths = make_workload(model_vocab(model), args.num_prompts, args.input_len, args.output_len, 0.0, 0)
    kw = dict(device=args.device, max_num_seqs=args.concurrency, num_kv_blocks=args.num_kv_blocks,
              block_size=args.block_size)
    logs = tempfile.mkdtemp(prefix="tidal-replicas-bench-")
    procs, ports = [], [free_port() for _ in range(args.replicas)]
    result: dict = {"config": vars(args) | {"model": model}, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "phases": {}}
    try:
        for i, port in enumerate(ports):
            env_kw = dict(kw)
            procs.append(start_server(model, env_kw, port, os.path.join(logs, f"replica{i}.log"), 600))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        rport = free_port()
        router = start_router(urls, rport, os.path.join(logs, "router.log"), 120)
        procs.append(router)
        # warm-up: every replica compiles/allocates once before anything is timed
        asyncio.run(load(ports, prompts[:8], [4] * 8, 8, 120))
        phases = [("1 replica direct", [ports[0]]), (f"{args.replicas} replicas direct", ports),
                  (f"{args.replicas} replicas via router", [rport])]
        groups = {"replicas": [p.pid for p in procs[:-1]], "router": [router.pid]}
        for name, target in phases:
            result["phases"][name] = timed_phase(target, groups, prompts, lengths, args)
        if args.compare_http:  # the same router with a connection per request instead of the channel
            hport = free_port()
            http_router = start_router(urls, hport, os.path.join(logs, "router-http.log"), 120,
                                       extra=("--upstream", "http"))
            procs.append(http_router)
            asyncio.run(load([hport], prompts[:8], [4] * 8, 8, 120))
            name = f"{args.replicas} replicas via router, --upstream http"
            result["phases"][name] = timed_phase([hport], {**groups, "router": [http_router.pid]}, prompts,
                                                 lengths, args)
    finally:
        for p in procs:
            stop_server(p, 10)
    ph = result["phases"]
    one, direct, routed = (ph.get(n, {}).get("output_tok_s", 0.0) for n, _ in phases)
    result["router_overhead"] = 1 - routed / direct if direct else None
    result["scaling"] = direct / one if one else None
    via = ph.get(phases[2][0], {}).get("cpu_s", {})
    result["router_cpu_share"] = via["router"] / via["replicas"] if via.get("replicas") else None
    http_phase = ph.get(f"{args.replicas} replicas via router, --upstream http")
    if http_phase and direct:
        result["router_overhead_http"] = 1 - http_phase["output_tok_s"] / direct
    result["load_average"] = os.getloadavg()
    print(f"\n{args.replicas} replicas, {args.num_prompts} prompts x {args.output_len} tokens, "
          f"{args.concurrency} streams, {args.device}, {os.cpu_count()} CPUs")
    print(f"{'phase':<42}{'tok/s':>10}{'done':>6}{'fail':>6}{'ttft p50 ms':>13}{'itl p50 ms':>12}"
          f"{'replica us/tok':>16}{'router us/tok':>15}")
    for name, s in ph.items():
        cpu = s.get("cpu_us_per_token", {})
        print(f"{name:<42}{s['output_tok_s']:>10.1f}{s['completed']:>6}{s['failed']:>6}"
              f"{s['ttft_ms'].get('p50', 0):>13.1f}{s['itl_ms'].get('p50', 0):>12.2f}"
              f"{cpu.get('replicas', 0):>16.1f}{cpu.get('router', 0):>15.1f}")
    if result["router_overhead"] is not None:
        print(f"router overhead: {100 * result['router_overhead']:.1f}% of throughput   router CPU / replica CPU: "
              f"{100 * (result['router_cpu_share'] or 0):.1f}%   scaling 1 -> {args.replicas}: "
              f"{result['scaling']:.2f}x   load average {result['load_average'][0]:.1f}")
    if "router_overhead_http" in result:
        print(f"router overhead with --upstream http: {100 * result['router_overhead_http']:.1f}%")
    return write_result(result, args.out or str(results_dir(args.publish) / f"replicas_{args.device}.json"))


def _export(commit: str, dest: str) -> str:
    """The tidal package as of `commit`, in dest (git archive)."""
    os.makedirs(dest, exist_ok=True)
    tar = subprocess.run(["git", "-C", ROOT, "archive", commit, "tidal"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=tar, check=True)
    return dest


def ab_main(args) -> int:
    """Router A/B: old and new routers alternately in front of the same replicas, each run paired
    with a direct phase just before it, so the load from other tenants moves both sides alike."""
    from tidal.models.tiny import tiny_checkpoint_cached
    model = args.model or tiny_checkpoint_cached("llama")
    prompts, lengths = make_workload(model_vocab(model), args.num_prompts, args.input_len, args.output_len, 0.0, 0)
    kw = dict(device=args.device, max_num_seqs=args.concurrency, num_kv_blocks=args.num_kv_blocks,
              block_size=args.block_size)
    logs = tempfile.mkdtemp(prefix="tidal-replicas-ab-")
    commits = {label: subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", c], check=True,
                                     capture_output=True, text=True).stdout.strip()
               for label, c in zip(("old", "new"), args.ab)}
    roots = {label: _export(c, os.path.join(logs, label)) for label, c in commits.items()}
    result: dict = {"config": vars(args) | {"model": model}, "commits": commits, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_start": os.getloadavg(), "runs": {"old": [], "new": []}}
    procs, ports = [], [free_port() for _ in range(args.replicas)]
    try:
        for i, port in enumerate(ports):
            procs.append(start_server(model, dict(kw), port, os.path.join(logs, f"replica{i}.log"), 600))
        asyncio.run(load(ports, prompts[:8], [4] * 8, 8, 120))
        for pair in range(args.pairs):
            for label in ("old", "new"):
                rport = free_port()
                router = start_router([f"http://127.0.0.1:{p}" for p in ports], rport,
                                      os.path.join(logs, f"router-{label}-{pair}.log"), 120, roots[label])
                try:
                    asyncio.run(load([rport], prompts[:8], [4] * 8, 8, 120))
                    groups = {"replicas": [p.pid for p in procs], "router": [router.pid]}
                    run: dict = {}
                    for name, target in (("direct", ports), ("router", [rport])):
                        run[name] = timed_phase(target, groups, prompts, lengths, args)
                    d, r = run["direct"]["output_tok_s"], run["router"]["output_tok_s"]
                    run["overhead"] = 1 - r / d if d else None
                    cpu = run["router"]["cpu_s"]
                    run["router_cpu_share"] = cpu["router"] / cpu["replicas"] if cpu["replicas"] else None
                    run["load_average"] = os.getloadavg()
                    result["runs"][label].append(run)
                    print(f"pair {pair} {label:<4} direct {d:8.1f} tok/s  router {r:8.1f} tok/s  overhead "
                          f"{100 * (run['overhead'] or 0):6.1f}%  router {run['router']['cpu_us_per_token']['router']:6.1f}"
                          f" us/tok  replicas {run['router']['cpu_us_per_token']['replicas']:6.1f} us/tok  share "
                          f"{100 * (run['router_cpu_share'] or 0):5.1f}%  failed {run['router']['failed']}", flush=True)
                finally:
                    stop_server(router, 10)
    finally:
        for p in procs:
            stop_server(p, 10)

    def median(xs):
        xs = sorted(x for x in xs if x is not None)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2 if xs else None

    result["summary"] = {label: {
        "overhead_median": median([r["overhead"] for r in runs]),
        "router_us_per_token_median": median([r["router"]["cpu_us_per_token"]["router"] for r in runs]),
        "replica_us_per_token_median": median([r["router"]["cpu_us_per_token"]["replicas"] for r in runs]),
        "router_cpu_share_median": median([r["router_cpu_share"] for r in runs]),
    } for label, runs in result["runs"].items()}
    result["load_average_end"] = os.getloadavg()
    for label, sm in result["summary"].items():
        print(f"{label} ({commits[label]}): median overhead {100 * (sm['overhead_median'] or 0):.1f}%, router "
              f"{sm['router_us_per_token_median']} us/token, share {100 * (sm['router_cpu_share_median'] or 0):.1f}%")
    return write_result(result, args.out or str(results_dir(args.publish) / f"replicas_{args.device}_ab.json"))


if __name__ == "__main__":
    sys.exit(main())
