"""Prometheus metrics of the API server and the engine it drives (`GET /metrics`).

Request, token and latency series are counted here as responses go out; queue sizes, KV usage
and weight version come from the engine's stats snapshot (sent with every heartbeat and control
reply); step times from the engine's output batches.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_CONTROL_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
STATES = ("starting", "serving", "draining", "paused", "sleeping", "updating", "dead")


disable_created_metrics()  # the *_created series only double the scrape size


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        lab = ["model"]
        self.requests = Counter(
            "tidal_requests",
            "Finished samples by finish reason (stop | length | abort | rejected | error | timeout)",
            lab + ["finish_reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "tidal_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("tidal_prompt_tokens", "Prompt tokens processed", lab, registry=r)
        self.generation_tokens = Counter("tidal_generation_tokens", "Tokens generated", lab, registry=r)
        self.inflight = Gauge("tidal_server_requests_inflight", "Requests the API server is serving", lab, registry=r)
        self.ttft = Histogram(
            "tidal_time_to_first_token_seconds", "Time to first token", lab, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tidal_inter_token_latency_seconds",
            "Time between streamed chunks, per token",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tidal_request_latency_seconds", "End-to-end request latency", lab, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("tidal_num_requests_running", "Samples running in the engine", lab, registry=r)
        self.waiting = Gauge("tidal_num_requests_waiting", "Samples waiting in the engine", lab, registry=r)
        self.held = Gauge("tidal_num_requests_held", "Requests held while the engine is not serving", lab, registry=r)
        self.kv_used = Gauge("tidal_kv_cache_blocks_used", "KV cache blocks in use", lab, registry=r)
        self.kv_total = Gauge("tidal_kv_cache_blocks_total", "KV cache blocks in the pool", lab, registry=r)
        self.kv_usage = Gauge("tidal_kv_cache_usage_ratio", "KV cache blocks used / total", lab, registry=r)
        self.preemptions = Gauge("tidal_num_preemptions", "Preemptions since start", lab, registry=r)
        self.prefix_hit = Gauge(
            "tidal_prefix_cache_hit_ratio", "Prefix cache hit tokens / query tokens", lab, registry=r
        )
        self.step_time = Histogram(
            "tidal_engine_step_seconds",
            "Engine step time (schedule + forward + update)",
            lab,
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.steps = Gauge("tidal_engine_steps", "Engine steps since start", lab, registry=r)
        self.weight_version = Gauge("tidal_weight_version", "Weight version being served", lab, registry=r)
        self.state = Gauge("tidal_engine_state", "1 for the engine's current state", lab + ["state"], registry=r)
        self.healthy = Gauge("tidal_engine_healthy", "1 when /health passes", lab, registry=r)
        self.control_ops = Counter(
            "tidal_control_ops", "Control operations by op and outcome", lab + ["op", "outcome"], registry=r
        )
        self.control_seconds = Histogram(
            "tidal_control_op_seconds", "Control operation duration", lab + ["op"], buckets=_CONTROL_BUCKETS, registry=r
        )
        self._last_step = 0
        m = model_name
        self._step_time = self.step_time.labels(m)
        self._gen_tokens = self.generation_tokens.labels(m)
        self._itl = self.itl.labels(m)
        self._ttft = self.ttft.labels(m)

    # -- engine side ---------------------------------------------------------------------
    def on_step(self, step_count: int, step_time_s: float) -> None:
        """One observation per output batch (the step that emitted it): a sample of the steps, as
        steps that emit nothing (a request not streamed emits only when it ends) send no batch."""
        if step_count != self._last_step:
            self._last_step = step_count
            self._step_time.observe(step_time_s)

    def on_engine_stats(self, s: dict[str, Any]) -> None:
        m = self.model_name
        self.running.labels(m).set(s.get("num_running", 0))
        self.waiting.labels(m).set(s.get("num_waiting", 0))
        self.held.labels(m).set(s.get("num_held", 0))
        used, total = s.get("kv_blocks_used", 0), s.get("kv_blocks_total", 0)
        self.kv_used.labels(m).set(used)
        self.kv_total.labels(m).set(total)
        self.kv_usage.labels(m).set(used / total if total else 0.0)
        self.preemptions.labels(m).set(s.get("num_preemptions", 0))
        q = s.get("prefix_cache_query_tokens", 0)
        self.prefix_hit.labels(m).set(s.get("prefix_cache_hit_tokens", 0) / q if q else 0.0)
        self.steps.labels(m).set(s.get("step_count", 0))
        self.weight_version.labels(m).set(s.get("weight_version", 0))
        cur = s.get("state")
        for st in STATES:
            self.state.labels(m, st).set(1.0 if st == cur else 0.0)

    def set_health(self, ok: bool) -> None:
        self.healthy.labels(self.model_name).set(1.0 if ok else 0.0)
        if not ok:
            for st in STATES:
                self.state.labels(self.model_name, st).set(0.0)

    def on_control(self, op: str, outcome: str, seconds: float) -> None:
        self.control_ops.labels(self.model_name, op, outcome).inc()
        self.control_seconds.labels(self.model_name, op).observe(seconds)

    # -- request side --------------------------------------------------------------------
    def on_finish(self, finish_reason: str, num_prompt_tokens: int, num_samples: int = 1) -> None:
        self.requests.labels(self.model_name, finish_reason).inc(num_samples)
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)

    def on_tokens(self, n: int) -> None:
        if n:
            self._gen_tokens.inc(n)

    def on_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def on_inter_token(self, seconds: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self._itl.observe(seconds / num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
