"""Schemathesis over the server's own OpenAPI schema, against a live `tidal serve`: whatever
the input, no 500, and every answer is one the schema documents (its status, content type and
body schema). (Valid-but-heavy input may meet its deadline: 504 of type "timeout"; while the
fuzzer has the engine paused or asleep, --reject-while-paused answers 503.)"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tidal.config import EngineConfig
from tidal.server.api import create_app

# The schema comes from the app object itself; nothing starts until its lifespan runs.
schema = schemathesis.openapi.from_dict(create_app(EngineConfig(model=None, device="cpu")).openapi())

ALLOWED_5XX = {503: {"engine_not_serving"}, 504: {"timeout"}}


@pytest.fixture(scope="module")
def fuzz_server(server_model, make_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-weights")
    s = make_server(server_model, "--max-model-len", "40", "--max-num-seqs", "16", "--reject-while-paused",
                    "--weights-root", str(root), "--request-timeout", "30")
    yield s
    s.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_from_any_input(case, fuzz_server):
    _bound_work(case.body)
    r = case.call(base_url=fuzz_server.url, timeout=60)
    if r.status_code >= 500:
        try:
            err = r.json().get("error", {})
        except Exception:
            err = {}
        assert err.get("type") in ALLOWED_5XX.get(r.status_code, ()), \
            f"{case.method} {case.path} {case.body!r} -> {r.status_code} {r.text[:500]}"
    case.validate_response(r, checks=[status_code_conformance, content_type_conformance,
                                      response_schema_conformance])


def _bound_work(body) -> None:
    """Keep valid-but-huge requests (n=128 samples of 1,000 prompts) small on a CPU; the values
    that make a request invalid are left alone."""
    if not isinstance(body, dict):
        return
    for key, cap in (("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8), ("best_of", 2)):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            body[key] = cap
    sp = body.get("sampling_params")
    if isinstance(sp, dict):
        _bound_work(sp)
    p = body.get("prompt")
    if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > 2:
        body["prompt"] = p[:2]
