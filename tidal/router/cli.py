"""`tidal router --replica URL ...` and `tidal serve --data-parallel-size N`.

    tidal router --replica http://10.0.0.1:8000 --replica http://10.0.0.2:8000 --port 8080
    tidal serve MODEL --data-parallel-size 4 --port 8000

`--data-parallel-size N` starts N `tidal serve` replicas on free ports of 127.0.0.1 (one per GPU
on a GPU host, through CUDA_VISIBLE_DEVICES) and the router on --host/--port in front of them.
With `--data-parallel-backend ray` (vLLM's flag) the replicas are Ray actors placed across the
Ray cluster this process joins (`ray.init()`: RAY_ADDRESS, a `ray start` cluster on this machine,
or a new local one), one GPU each where the cluster has GPUs (tidal/router/ray_replicas.py); each
binds its node's address unless `--data-parallel-replica-host` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import httpx

_ROUTER_EPILOG = """\
endpoints (besides every replica endpoint, proxied):
  POST /v1/completions /v1/chat/completions /generate   routed; requests move when a replica goes
  control, fanned out to every replica:  /v1/pause /v1/resume /v1/abort_requests /v1/sleep /v1/wake_up
                                         /v1/flush_cache /v1/update_weights GET /v1/state /health
  replicas: GET/POST/DELETE /v1/replicas {url}; POST /v1/replicas/drain {url, timeout_s}"""


def add_router_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "router",
        help="one endpoint over several tidal serve replicas",
        description="Route requests over tidal serve replicas; fan control calls out to all.",
        epilog=_ROUTER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="a replica's base URL, e.g. http://127.0.0.1:8001 (repeatable; more can join at runtime)",
    )
    add_router_options(p)
    p.set_defaults(func=cmd_router)
    return p


def add_router_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("router")
    if not any(a.dest == "host" for a in p._actions):
        g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
        g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
        g.add_argument("--api-key", default=os.environ.get("TIDAL_API_KEY"))
        g.add_argument("--admin-key", default=os.environ.get("TIDAL_ADMIN_KEY"))
        g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--probe-interval", type=float, default=0.5, help="seconds between health probes of each replica (default: 0.5)"
    )
    g.add_argument(
        "--prefix-slack",
        type=int,
        default=4,
        help="a repeated prompt goes to its earlier replica while that one has at most this "
        "many more outstanding samples than the least loaded (default: 4)",
    )
    g.add_argument(
        "--upstream",
        choices=("channel", "http"),
        default="channel",
        help="channel: a replica's generation requests share one connection to it, each engine "
        "step's tokens of all of them in one write (replicas that offer none get http); http: a "
        "connection per request (default: channel)",
    )


def add_data_parallel_option(serve: argparse.ArgumentParser) -> None:
    """The data-parallel flags and the router's own options on `tidal serve`; the flags added here
    are recorded (`args.router_only_flags`) so the replicas' command lines leave them out."""
    known = _option_strings(serve)
    serve.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="N replicas (one engine process each, one GPU each on a GPU host) behind one "
        "router on --host/--port (default: 1, no router)",
    )
    serve.add_argument(
        "--data-parallel-backend",
        choices=("mp", "ray"),
        default="mp",
        help="mp: the replicas are child processes on this machine; ray: Ray actors across the Ray "
        "cluster (needs ray: pip install 'tidal[cluster]') (default: mp)",
    )
    serve.add_argument(
        "--data-parallel-replica-host",
        default=None,
        metavar="HOST",
        help="with --data-parallel-backend ray: the address every replica binds and is reached at "
        "(default: its node's IP address)",
    )
    add_router_options(serve)
    serve.set_defaults(router_only_flags=sorted(_option_strings(serve) - known))


def _option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def _settings(args: argparse.Namespace, replicas: list[str]):
    from tidal.router.app import RouterSettings

    return RouterSettings(
        replicas=replicas,
        api_key=args.api_key,
        admin_key=args.admin_key,
        probe_interval_s=args.probe_interval,
        prefix_slack=args.prefix_slack,
        channels=args.upstream == "channel",
    )


def _run_router(args: argparse.Namespace, replicas: list[str]) -> int:
    import uvicorn

    from tidal.router.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(_settings(args, replicas))
    except ValueError as e:
        print(f"tidal router: {e}", file=sys.stderr)
        return 2
    logging.getLogger("tidal.router").info("router on http://%s:%s over %s", args.host, args.port, replicas)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5
    )
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from tidal.router.replicas import normalise_url

    try:
        replicas = [normalise_url(u) for u in args.replica]
    except ValueError as e:
        print(f"tidal router: --replica {e}", file=sys.stderr)
        return 2
    return _run_router(args, replicas)


def serve_data_parallel(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`tidal serve ... --data-parallel-size N`: N child `tidal serve` processes + the router here."""
    n = args.data_parallel_size
    if n < 1:
        print(f"tidal serve: --data-parallel-size {n}: expected >= 1", file=sys.stderr)
        return 2
    child_argv = replica_argv(args, argv)
    if args.data_parallel_backend == "ray":
        return _serve_on_ray(args, child_argv[1:] if child_argv[:1] == ["serve"] else child_argv)
    gpus = _gpu_count() if args.device in ("auto", "cuda") or str(args.device).startswith("cuda") else 0
    procs, urls = [], []
    try:
        for i in range(n):
            port = _free_port()
            env = dict(os.environ)
            if gpus:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
                env["CUDA_VISIBLE_DEVICES"] = visible[i % len(visible)]
            cmd = [sys.executable, "-m", "tidal.cli", *child_argv, "--host", "127.0.0.1", "--port", str(port)]
            procs.append(subprocess.Popen(cmd, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        _wait_healthy(procs, urls, args)
        return _run_router(args, urls)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _serve_on_ray(args: argparse.Namespace, serve_args: list[str]) -> int:
    """The replicas as Ray actors (tidal/router/ray_replicas.py), the router here; stopping the
    router stops them (and Ray ends a driver's actors with the driver, however it exits)."""
    try:
        import ray

        from tidal.router.ray_replicas import start_replicas
    except ImportError as e:
        need = "--data-parallel-backend ray needs ray (pip install 'tidal[cluster]')"
        print(f"tidal serve: {need}: {e}", file=sys.stderr)
        return 2
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    fleet = None
    try:
        fleet = start_replicas(
            args.data_parallel_size,
            serve_args,
            admin_key=args.admin_key or args.api_key,
            host=args.data_parallel_replica_host,
        )
        return _run_router(args, fleet.urls)
    finally:
        if fleet is not None:
            fleet.stop()
        ray.shutdown()


def replica_argv(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """The serve command line less the data-parallel and router flags; each replica binds its own
    port on 127.0.0.1 (or its Ray node), the router takes --host/--port."""
    return _strip(list(argv), {*args.router_only_flags, "--host", "--port"})


def _strip(argv: list[str], flags: set[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _wait_healthy(
    procs: list[subprocess.Popen], urls: list[str], args: argparse.Namespace, timeout_s: float = 600.0
) -> None:
    key = args.admin_key or args.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout_s
    pending = set(range(len(urls)))
    while pending and time.monotonic() < deadline:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                raise SystemExit(f"tidal serve: replica {i} exited with {procs[i].returncode}")
            try:
                if httpx.get(urls[i] + "/health", headers=headers, timeout=2).status_code == 200:
                    pending.discard(i)
            except httpx.HTTPError:
                pass
        if pending:
            time.sleep(0.25)
    if pending:
        raise SystemExit(f"tidal serve: replicas {sorted(pending)} not healthy within {timeout_s}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal")
    sub = parser.add_subparsers(dest="command", required=True)
    add_router_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
