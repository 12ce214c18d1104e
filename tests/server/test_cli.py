"""`tidal --help`, `tidal serve --help`, `tidal generate` (the README's quick start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tidal import LLM, SamplingParams
from tidal.cli import build_parser, main


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tidal.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_explains_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "generate" in out and "MODEL_DIR" in out
    serve_help = build_parser().parse_args(["serve"])  # defaults a new user gets
    assert serve_help.host == "127.0.0.1" and serve_help.port == 8000 and serve_help.model is None
    assert serve_help.reject_while_paused is False and serve_help.api_key in (None, os.environ.get("TIDAL_API_KEY"))


def test_serve_help_lists_the_options():
    r = _run("serve", "--help", timeout=60)
    assert r.returncode == 0
    for opt in ("--host", "--port", "--dtype", "--device", "--max-num-seqs", "--reject-while-paused",
                "--api-key", "--admin-key", "--weights-root", "127.0.0.1", "/v1/completions", "/v1/pause"):
        assert opt in r.stdout, opt


def test_generate_matches_offline_llm(server_model):
    r = _run("generate", server_model, "--prompt", "Hello, Tidal", "--prompt", "second", "--max-tokens", "12",
             "--json", "--block-size", "4")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    llm = LLM(server_model, block_size=4)
    try:
        ref = llm.generate(["Hello, Tidal", "second"], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
    finally:
        llm.shutdown()
    assert [x["prompt"] for x in lines] == ["Hello, Tidal", "second"]
    assert [x["outputs"][0]["token_ids"] for x in lines] == [o.outputs[0].token_ids for o in ref]


def test_generate_with_the_embedded_default_model(tmp_path):
    env_cache = {"TIDAL_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "tidal.cli", "generate", "--max-tokens", "4"], capture_output=True,
                       text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", **env_cache})
    assert r.returncode == 0, r.stderr
    assert "Hello, Tidal" in r.stdout and "tokens" in r.stdout


def test_bad_arguments_are_reported():
    r = _run("serve", "/no/such/dir", timeout=60)
    assert r.returncode == 2 and "/no/such/dir" in r.stderr
    r = _run("generate", "--max-tokens", "0", timeout=60)
    assert r.returncode == 2 and "max_tokens" in r.stderr


def test_engine_flags_are_generated_from_engine_config():
    """Every EngineConfig field with CLI metadata is a flag with the dataclass's default, on both
    commands, and sets its field (tidal/config.py is the one definition)."""
    import dataclasses

    from tidal.cli import _engine_config
    from tidal.config import EngineConfig
    parser = build_parser()
    flagged = [f for f in dataclasses.fields(EngineConfig) if "help" in f.metadata]
    assert {"overlap_scheduling", "attention_backend", "batch_invariant", "max_model_len"} <= {f.name for f in flagged}
    for command in ("serve", "generate"):
        args = parser.parse_args([command])
        for f in flagged:
            if f.metadata.get("group") == "server" and command == "generate":
                assert not hasattr(args, f.name)
                continue
            assert getattr(args, f.name) == f.default, (command, f.name)
    assert _engine_config(parser.parse_args(["serve"])) == EngineConfig()
    cfg = _engine_config(parser.parse_args(["serve", "--no-overlap-scheduling", "--attention-backend", "torch",
                                            "--no-prefix-caching", "--max-model-len", "64", "--enforce-eager"]))
    assert (cfg.overlap_scheduling, cfg.attention_backend, cfg.enable_prefix_caching, cfg.max_model_len,
            cfg.enforce_eager) == (False, "torch", False, 64, True)


def test_model_limits_are_one_line_errors(server_model):
    r = _run("generate", "/no/such/dir", timeout=60)
    assert r.returncode == 2 and "/no/such/dir" in r.stderr and "Traceback" not in r.stderr
    for command in ("serve", "generate"):
        r = _run(command, server_model, "--max-model-len", "100000", timeout=120)
        assert r.returncode == 2, r.stderr
        assert "max_position_embeddings" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _run("generate", "--max-model-len", "1", timeout=60)
    assert r.returncode == 2 and "max_model_len" in r.stderr and "Traceback" not in r.stderr
