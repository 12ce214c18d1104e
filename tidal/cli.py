"""The `tidal` command: `tidal serve` (HTTP server) and `tidal generate` (offline generation).

    tidal generate [MODEL_DIR] --prompt "Hello"       generate text, print it, exit
    tidal serve [MODEL_DIR] [--port 8000]             OpenAI-compatible + RL + control API

With no MODEL_DIR both use the embedded tiny default model (random weights: for trying things).

One job past 400 lines: the command line; the engine flags are generated from EngineConfig, what
remains is each subcommand's own arguments and their checks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

_DESCRIPTION = """\
Tidal: an LLM rollout engine for RL, with a control plane a trainer can drive.

commands:
  serve      serve a model over HTTP (OpenAI API, /generate, control API, /metrics)
  generate   generate from prompts offline and print the results

MODEL_DIR is a Hugging Face-format checkpoint directory (config.json, *.safetensors,
tokenizer files) of a Llama, Qwen2 or Qwen3 model; without one, the embedded tiny
default model is used (random weights, for trying things out).

Run `tidal serve --help` or `tidal generate --help` for their options."""

_SERVE_EPILOG = """\
examples:
  tidal serve                                   # the tiny default model on 127.0.0.1:8000
  tidal serve ~/models/Qwen3-0.6B --port 8080 --max-num-seqs 128
  tidal serve MODEL --host 0.0.0.0 --api-key $KEY --admin-key $ADMIN --weights-root /ckpts

then, e.g.:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Hello", "max_tokens": 16}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
             print(c.completions.create(model='MODEL', prompt='Hello').choices[0].text)"

endpoints:
  POST /v1/completions, /v1/chat/completions   OpenAI-compatible (stream, n, stop, logprobs, seed)
  POST /generate                               token ids in, token ids + logprobs + weight_version out
  GET  /v1/models, /health, /metrics
  control (admin key): POST /v1/pause /v1/resume /v1/abort_requests /v1/sleep /v1/wake_up
                       /v1/update_weights /v1/flush_cache; GET /v1/is_paused /v1/state

Keys can also come from the environment: TIDAL_API_KEY, TIDAL_ADMIN_KEY."""


def _engine_args(p: argparse.ArgumentParser, server: argparse._ArgumentGroup | None = None) -> None:
    """The engine options, one per EngineConfig field that has CLI metadata (tidal/config.py).
    Fields of the "server" group go into `server` (tidal serve only)."""
    from tidal.config import EngineConfig

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="HF-format checkpoint directory (default: the embedded tiny model)",
    )
    groups = {"engine": p.add_argument_group("engine"), "server": server}
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        g = groups[meta.get("group", "engine")]
        if g is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            if f.default:  # --x / --no-x, and a short alias where one is customary
                g.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=True, help=f"{meta['help']} (default: on)"
                )
                if "negation" in meta:
                    g.add_argument(meta["negation"], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            else:
                g.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = _FLAG_TYPES[f.type.removesuffix(" | None")]
        shown = "" if f.default is None and "default:" in meta["help"] else f" (default: {f.default})"
        g.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"), help=meta["help"] + shown)


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def _engine_config(args: argparse.Namespace):
    from tidal.config import EngineConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineConfig)
        if hasattr(args, f.name) and f.name != "model"
    }
    return EngineConfig(model=args.model, **given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP",
        epilog=_SERVE_EPILOG,
        description="Serve a model over HTTP: the OpenAI API, /generate and the control API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h = serve.add_argument_group("server")
    _engine_args(serve, h)
    h.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for all)"
    )
    h.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    h.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: the model directory's name)"
    )
    h.add_argument(
        "--request-timeout",
        type=float,
        default=1800.0,
        help="deadline of one generation request in seconds (default: 1800)",
    )
    h.add_argument(
        "--control-timeout",
        type=float,
        default=60.0,
        help="default deadline of a control call in seconds (default: 60)",
    )
    h.add_argument(
        "--stuck-timeout",
        type=float,
        default=60.0,
        help="/health fails when the engine loop has not answered for this long (default: 60)",
    )
    h.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        help="seconds without a heartbeat from the engine process before /health fails, requests "
        "in flight fail and new ones get 503, until it answers again (default: 5)",
    )
    h.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=5.0,
        help="on SIGTERM or Ctrl-C, seconds that requests in flight may still run before they are "
        "ended with their partial output, finish_reason 'abort' (default: 5)",
    )
    h.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="close a keep-alive connection idle for this many seconds (default: 5)",
    )
    h.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="close a connection whose request headers have not all arrived within this many seconds (default: 10)",
    )
    h.add_argument(
        "--limit-concurrency",
        type=int,
        default=2048,
        help="answer 503 once this many connections or requests are open; also mind the open-file "
        "limit, ulimit -n (default: 2048)",
    )
    h.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    h.add_argument(
        "--max-body-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="largest request body accepted; larger ones get 413 (default: 32 MiB)",
    )
    s = serve.add_argument_group("security")
    s.add_argument(
        "--api-key",
        default=os.environ.get("TIDAL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on inference endpoints (env: TIDAL_API_KEY)",
    )
    s.add_argument(
        "--admin-key",
        default=os.environ.get("TIDAL_ADMIN_KEY"),
        help="require this key on control endpoints (env: TIDAL_ADMIN_KEY); without it they are refused "
        "when --api-key is set or --host is beyond loopback",
    )
    s.add_argument("--weights-root", default=None, help="only allow /v1/update_weights from directories under this one")
    serve.set_defaults(func=cmd_serve)
    from tidal.router.cli import add_data_parallel_option, add_router_parser

    add_data_parallel_option(serve)

    gen = sub.add_parser(
        "generate",
        help="generate from prompts offline and print the results",
        description="Generate from one or more prompts with the offline engine and print the outputs (no server).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  tidal generate --prompt 'Hello, Tidal'\n"
        "  tidal generate ~/models/Qwen3-0.6B --prompt 'Hi' --prompt 'Bye' --max-tokens 64 "
        "--temperature 0.7 --n 2 --json",
    )
    _engine_args(gen)
    o = gen.add_argument_group("generation")
    o.add_argument(
        "--prompt", action="append", default=None, help="a prompt (repeat for several; default: 'Hello, Tidal')"
    )
    o.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    o.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per sample (default: 32)")
    o.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--top-k", type=int, default=-1)
    o.add_argument("--n", type=int, default=1, help="samples per prompt (default: 1)")
    o.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    o.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)
    add_router_parser(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "data_parallel_size", 1) > 1:  # N replicas behind one router (tidal/router/)
        from tidal.router.cli import serve_data_parallel

        return serve_data_parallel(args, args.argv)
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tidal.server")
    try:
        config = _engine_config(args)
    except ValueError as e:
        print(f"tidal serve: {e}", file=sys.stderr)
        return 2
    if args.model is not None and not os.path.isdir(args.model):
        print(f"tidal serve: MODEL_DIR {args.model!r} is not a directory", file=sys.stderr)
        return 2
    try:  # what the model's config.json can tell, before the server and its engine process start
        _check_against_model(config)
    except ValueError as e:
        print(f"tidal serve: {e}", file=sys.stderr)
        return 2
    if args.weights_root is not None and not os.path.isdir(args.weights_root):
        print(f"tidal serve: --weights-root {args.weights_root!r} is not a directory", file=sys.stderr)
        return 2
    if args.weights_root is not None:  # the engine confines every file it opens for an update (shards too)
        config.weights_root = os.path.realpath(args.weights_root)
    for name in (
        "heartbeat_timeout",
        "shutdown_grace_s",
        "timeout_keep_alive",
        "header_timeout",
        "limit_concurrency",
        "max_body_bytes",
    ):
        if getattr(args, name) <= 0:
            print(
                f"tidal serve: --{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a positive number",
                file=sys.stderr,
            )
            return 2
    try:  # before the model loads (which takes a while), so a busy port is reported at once
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(
            f"tidal serve: cannot listen on {args.host}:{args.port}: {e.strerror or e} "
            "(is another server using it? pick another with --port)",
            file=sys.stderr,
        )
        return 2
    code = _serve(args, config, sock, level, log)
    # The server has stopped its engine process and removed its files. Skipping the interpreter's
    # teardown spares the user some thirty "nanobind: leaked ..." lines from triton's bindings.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_against_model(config) -> None:
    """The engine checks these too, but from inside its process a failure reaches the terminal
    as a traceback; here it is one line."""
    if config.model is None:
        return
    from tidal.models.config import parse_arch, read_hf_config

    arch = parse_arch(*read_hf_config(config.model))
    if config.max_model_len is not None and config.max_model_len > arch.max_model_len:
        raise ValueError(
            f"--max-model-len {config.max_model_len} is invalid: expected at most the model's "
            f"context length, max_position_embeddings={arch.max_model_len}"
        )


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _serve(args: argparse.Namespace, config, sock, level: str, log: logging.Logger) -> int:
    import uvicorn

    from tidal.server.api import ServerSettings, create_app
    from tidal.server.http_protocol import protocol_class

    settings = ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        admin_key=args.admin_key,
        weights_root=args.weights_root,
        request_timeout_s=args.request_timeout,
        control_timeout_s=args.control_timeout,
        stuck_after_s=args.stuck_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout,
        log_level=level,
        host=args.host,
        max_body_bytes=args.max_body_bytes,
    )
    app = create_app(config, settings)
    server = app.state.server
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"
    grace = args.shutdown_grace_s

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                log.info(
                    "Tidal is serving %r at %s  (OpenAI base_url: %s/v1; engine pid %s; Ctrl-C to stop)",
                    server.model_name,
                    url,
                    url,
                    server.client.engine_pid if server.client else None,
                )

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has stopped, so SIGTERM would end the process
            # with status -15 after a clean shutdown; a clean shutdown exits 0.
            self._captured_signals.clear()

        async def shutdown(self, sockets=None) -> None:
            # Stop accepting, then end the requests in flight the way pause(abort) does, so
            # every client gets its partial output and a final event before connections close.
            for s in self.servers:
                s.close()
            client = server.client
            if client is not None and client.dead is None and not self.force_exit:
                await client.drain(grace)
            for channel in list(server.channels):  # a router's channel would hold the connection open
                channel.close()
            await super().shutdown(sockets)

    uv = _Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            access_log=args.log_level == "debug",
            timeout_graceful_shutdown=10,
            lifespan="on",
            http=protocol_class(args.header_timeout),
            timeout_keep_alive=args.timeout_keep_alive,
            limit_concurrency=args.limit_concurrency,
        )
    )
    try:
        uv.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    except SystemExit as e:  # uvicorn exits 3 when the app fails to start; it has logged why
        return e.code if isinstance(e.code, int) else 1
    if not uv.started:
        return 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from tidal import LLM, SamplingParams

    logging.basicConfig(level=logging.WARNING)
    try:
        config = _engine_config(args)
    except ValueError as e:
        print(f"tidal generate: {e}", file=sys.stderr)
        return 2
    if args.model is not None and not os.path.isdir(args.model):
        print(f"tidal generate: MODEL_DIR {args.model!r} is not a directory", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            stop=args.stop or [],
            logprobs=0,
        )
    except ValueError as e:
        print(f"tidal generate: {e}", file=sys.stderr)
        return 2
    kwargs = {f: getattr(config, f) for f in config.__slots__ if f != "model"}
    try:
        llm = LLM(config.model, **kwargs)
    except ValueError as e:  # a config the model cannot take (e.g. --max-model-len beyond its context)
        print(f"tidal generate: {e}", file=sys.stderr)
        return 2
    try:
        prompts = args.prompt or ["Hello, Tidal"]
        if args.chat:
            if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
                print("tidal generate: --chat: the model has no chat template", file=sys.stderr)
                return 2
            prompts = [
                llm.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except ValueError as e:
            print(f"tidal generate: {e}", file=sys.stderr)
            return 2
        for prompt, out in zip(args.prompt or ["Hello, Tidal"], outs):
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "outputs": [
                                {
                                    "text": c.text,
                                    "token_ids": c.token_ids,
                                    "logprobs": c.token_logprobs,
                                    "finish_reason": c.finish_reason,
                                }
                                for c in out.outputs
                            ],
                        }
                    )
                )
            else:
                for c in out.outputs:
                    print(f"{prompt!r} -> {c.text!r}  [{len(c.token_ids)} tokens, {c.finish_reason}]")
    finally:
        llm.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
