"""Two RL pipelines share a pool of device slots through GpuScheduler, on real Tidal replicas.

    python examples/pipelines.py                       # CPU, tiny model, 4 slots, 3 steps each
    python examples/pipelines.py --scenario kill-replica --steps 2

Each pipeline has its own endpoint (`tidal router`) and a ReplicaController
(tidal/cluster/controller.py) that the scheduler calls to shrink and expand its generation cluster:
drain through the router, sleep (kv_cache + weights), verify the release, and on expand wake or
start a replica, bring it to the pipeline's weight version by a selective push of the pipeline's
host-memory copy, and add it to the router. Seed 003's topology: pipeline A trains on the first
half of the slots, B on the second half, both generate on all of them (an odd pool's last slot
only generates).

One step of a pipeline: rollout through its router (GRPO groups at temperature 1, plus one greedy
probe per prompt whose output is later checked against an uninterrupted reference engine) →
release generation and take the training slots (`release_then_request`) → one GRPO step of
examples/grpo.py's trainer on the rollout (a real gradient step: the weights change) → weight push
(kept in host memory; pushed to replicas serving now; slept ones get it when woken) → release.

A sample whose pipeline loses its last replica ends with finish_reason="abort" and its partial
tokens; the rollout keeps it and continues it (prompt + tokens so far, the remaining max_tokens)
once the pipeline has a replica again, so every sample gets exactly one final output.

Scenarios: `boundary` (both rollouts open at a training boundary, neither starves), `kill-pipeline`
(pipeline A dies mid-rollout; B continues and takes its slots), `kill-replica` (one of A's replica
processes is SIGKILLed mid-rollout; its requests continue on A's other replicas).

Writes a JSON (--out: per-phase shrink/expand times, checks) and a PNG timeline (--plot: which
pipeline and stage held each slot over time).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo import DigitsTask, Sample, group_advantages, token_versions, train_step  # noqa: E402

from tidal.cluster import ClusterSpec, GpuScheduler, PipelineSpec, Priority  # noqa: E402
from tidal.cluster.controller import ControllerConfig, HostWeights, ReplicaController, RouterProcess  # noqa: E402
from tidal.models.tiny import make_tiny_checkpoint, quiet_progress_bars  # noqa: E402

SCENARIOS = ("boundary", "kill-pipeline", "kill-replica")
KILL_RUNNING = 2                            # kill-replica: requests the victim's engine must be running
SERVE_ARGS = ("--block-size", "16", "--num-kv-blocks", "2048", "--max-num-seqs", "32", "--log-level", "warning")


@dataclass(slots=True)
class Outcome:
    """One sample of a rollout, however many requests it took."""

    key: str
    prompt_ids: list[int]
    greedy: bool
    version: int                                # the pipeline's weight version during the rollout
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    moved_at: list[int] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)   # token counts where an aborted sample went on
    finals: int = 0
    finish: str | None = None


@dataclass(slots=True)
class Interval:
    slot: int
    pipeline: str
    stage: str                                  # rollout | train | shrink | expand
    start: float
    end: float


class Pipeline:
    def __init__(self, pid: str, sched: GpuScheduler, train: tuple[int, ...], gen: tuple[int, ...],
                 model_dir: str, args: argparse.Namespace, t0: float, work: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.pid, self.sched, self.args, self.t0, self.work = pid, sched, args, t0, work
        self.train_gpus = train
        self.spec = PipelineSpec(pid, clusters={"train": ClusterSpec(gpus=train),
                                                "gen": ClusterSpec(gpus=gen, generation=True)})
        self.model_dir = model_dir
        tok = AutoTokenizer.from_pretrained(model_dir)
        with quiet_progress_bars():
            self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.task = DigitsTask(tok, self.policy.config.vocab_size, 6, seed=ord(pid[0]))
        self.weights = HostWeights()
        self.history: dict[int, dict[str, torch.Tensor] | None] = {0: None}   # None: the base checkpoint
        self.outcomes: list[Outcome] = []
        self.in_rollout: list[Outcome] = []     # the open rollout's samples
        self.steps: list[dict[str, Any]] = []
        self.train_intervals: list[Interval] = []
        self.rollout_started = asyncio.Event()
        self.router: RouterProcess | None = None
        self.ctrl: ReplicaController | None = None

    async def start(self) -> None:
        self.router = await RouterProcess.start(self.work)
        cfg = ControllerConfig(model=self.model_dir, serve_args=SERVE_ARGS, start_timeout_s=self.args.start_timeout,
                               log_dir=tempfile.mkdtemp(prefix=f"{self.pid}-", dir=self.work))
        self.ctrl = ReplicaController(self.pid, self.spec.clusters["gen"], self.router.url, cfg, self.weights)
        if self.args.prestart:    # CPU: every replica starts at once, then expands only wake them
            await self.ctrl.prestart(list(range(self.ctrl.spec.num_replicas)))
        await self.sched.register_pipeline(self.spec, generation=self.ctrl)

    async def close(self) -> list[dict]:
        out = await self.ctrl.close() if self.ctrl is not None else []
        if self.router is not None:
            await self.router.stop()
        return out

    # ---- one step --------------------------------------------------------------------------

    async def run(self) -> None:
        for step in range(self.args.steps):
            await self.step(step)

    async def step(self, step: int) -> None:
        a, version = self.args, self.weights.version
        prompts = self.task.prompts(step, a.prompts)
        t = time.monotonic()
        await self.sched.request_gpus(self.pid, "gen", Priority.GENERATION, step_target=a.prompts * (a.n + 1),
                                      timeout_s=a.timeout)
        waited = time.monotonic() - t
        outcomes = await self.rollout(step, prompts, version)
        await self.sched.release_then_request(self.pid, release="gen", request="train",
                                              priority=Priority.ACTOR_TRAINING, timeout_s=a.timeout)
        t_train = self._now()
        samples = [Sample(int(o.key.split(".")[1]), o.prompt_ids, o.output_ids, o.logprobs, o.versions)
                   for o in outcomes if not o.greedy]
        for s in samples:
            s.reward = self.task.reward(s.output_ids, a.max_tokens)
        group_advantages(samples)
        targs = argparse.Namespace(ppo_epochs=1, max_staleness=0, micro_batch=256, clip=0.2, max_grad_norm=1.0)
        before = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        stats = await asyncio.to_thread(train_step, self.policy, self.opt, samples, version, targs, self.pad_id)
        changed = max(float((p.detach() - before[n]).abs().max()) for n, p in self.policy.named_parameters())
        push = await self.ctrl.push(self.policy.state_dict(), version + 1)
        self.history[version + 1] = self.weights.tensors
        t_end = self._now()
        self.train_intervals += [Interval(g, self.pid, "train", t_train, t_end) for g in self.train_gpus]
        await self.sched.release_gpus(self.pid, "train", timeout_s=a.timeout)
        rewards = [s.reward for s in samples]
        self.steps.append({"step": step, "version": version, "waited_for_replica_s": round(waited, 3),
                           "reward_mean": sum(rewards) / len(rewards), "loss": stats.loss,
                           "max_weight_change": changed, "pushed_version": push["version"],
                           "pushed_to": push["pushed_to"], "train_s": round(t_end - t_train, 3)})

    # ---- rollout ---------------------------------------------------------------------------

    async def rollout(self, step: int, prompts: list[list[int]], version: int) -> list[Outcome]:
        a = self.args
        todo = []
        for g, p in enumerate(prompts):
            todo.append(Outcome(f"{step}.{g}.greedy", p, True, version))
            todo += [Outcome(f"{step}.{g}.{i}", p, False, version) for i in range(a.n)]
        done = [0]
        self.in_rollout = todo
        self.rollout_started.set()
        async with httpx.AsyncClient(timeout=a.timeout) as http:
            await asyncio.gather(*(self._sample(http, o, step * 1000 + i, done, len(todo))
                                   for i, o in enumerate(todo)))
        self.outcomes += todo
        return todo

    async def _sample(self, http: httpx.AsyncClient, o: Outcome, seed: int, done: list[int], total: int) -> None:
        a = self.args
        deadline = time.monotonic() + a.timeout
        while o.finish is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.pid} sample {o.key}: no final output within {a.timeout}s")
            left = a.max_tokens - len(o.output_ids)
            temp = {"temperature": 0.0} if o.greedy else {"temperature": 1.0, "seed": seed + 7919 * len(o.output_ids)}
            sp = {"max_tokens": left, "ignore_eos": True, "logprobs": 0, **temp}
            body = {"input_ids": o.prompt_ids + o.output_ids, "sampling_params": sp}
            try:
                r = await http.post(self.router.url + "/generate", json=body)
            except httpx.HTTPError:
                r = None
            if r is None or r.status_code == 503:       # no replica right now
                await self._wait_for_replica(deadline)
                continue
            if r.status_code != 200:
                raise RuntimeError(f"{self.pid} sample {o.key}: /generate answered {r.status_code}: {r.text[:300]}")
            self._absorb(o, r.json())
            if o.finish == "abort":                     # the pipeline's last replica went: go on later
                o.resumed_at.append(len(o.output_ids))
                o.finish = None
                await self._wait_for_replica(deadline)
        done[0] += 1
        self.sched.report_progress(self.pid, done[0], total)

    def _absorb(self, o: Outcome, out: dict) -> None:
        ids = out["output_ids"]
        n0 = len(o.output_ids)
        o.output_ids += ids
        lps = out.get("output_logprobs") or []
        if len(lps) != len(ids) and not o.greedy:
            raise RuntimeError(f"{self.pid} sample {o.key}: {len(lps)} output_logprobs for {len(ids)} output_ids, "
                               f"expected one per token")
        o.logprobs += [float(x) for x in lps] if len(lps) == len(ids) else [0.0] * len(ids)
        o.versions += token_versions(out["weight_spans"], len(ids)) if ids else []
        o.moved_at += [n0 + m for m in out.get("moved_at") or []]
        if out["finish_reason"] != "abort":
            o.finals += 1
        o.finish = out["finish_reason"]

    async def _wait_for_replica(self, deadline: float) -> None:
        while not self.ctrl.serving:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.pid}: no replica came back before the deadline")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ctrl.changed.wait(), left)

    def _now(self) -> float:
        return time.monotonic() - self.t0

    # ---- after the run ---------------------------------------------------------------------

    def intervals(self) -> list[Interval]:
        """Generation slots from the controller's records, training slots as measured."""
        out = list(self.train_intervals)
        off = self.ctrl.t0 - self.t0
        serving_since: dict[int, float] = {}
        for rec in sorted(self.ctrl.records, key=lambda r: r.start):
            if rec.op == "prestart":
                continue
            start, end = rec.start + off, rec.start + off + sum(rec.phases.values())
            slot = rec.slot[0]
            if rec.op == "shrink" and rec.rank in serving_since:
                out.append(Interval(slot, self.pid, "rollout", serving_since.pop(rec.rank), start))
            out.append(Interval(slot, self.pid, rec.op, start, end))
            if rec.op == "expand":
                serving_since[rec.rank] = end
        out += [Interval(self.ctrl.spec.replica(r)[0], self.pid, "rollout", s, self._now())
                for r, s in serving_since.items()]
        return out


def reference_check(pipes: list[Pipeline]) -> dict[str, Any]:
    """Greedy probes against an uninterrupted in-process engine at the same weights."""
    from safetensors.torch import load_file

    from tidal import LLM, SamplingParams

    p0 = pipes[0]
    llm = LLM(p0.model_dir, device="cpu", block_size=16, num_kv_blocks=1024)
    base = load_file(os.path.join(p0.model_dir, "model.safetensors"))
    sp = SamplingParams(temperature=0.0, max_tokens=p0.args.max_tokens, ignore_eos=True)
    out, loaded = {}, 0
    for p in pipes:
        probes = [o for o in p.outcomes if o.greedy and o.finish is not None]
        mismatched, checked, moved = [], 0, 0
        for v in sorted({o.version for o in probes}):
            loaded += 1
            llm.update_weights(named_tensors=p.history[v] if p.history[v] is not None else base, version=loaded)
            group = [o for o in probes if o.version == v]
            for o, ref in zip(group, llm.generate([o.prompt_ids for o in group], sp, use_tqdm=False)):
                checked += 1
                moved += bool(o.moved_at or o.resumed_at)
                if o.output_ids != ref.outputs[0].token_ids:
                    mismatched.append(o.key)
        out[p.pid] = {"checked": checked, "migrated_or_resumed": moved, "mismatched": mismatched}
    return out


# ---- the run -----------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="tidal-pipelines-")
    model_dir = make_tiny_checkpoint(os.path.join(work, "model"), "llama", seed=args.seed)
    sched = GpuScheduler(args.slots, default_timeout_s=args.timeout, controller_timeout_s=args.start_timeout + 60)
    t0 = time.monotonic()
    half = args.slots // 2                    # an odd pool's last slot only generates
    slots = tuple(range(args.slots))
    pipes = [Pipeline("A", sched, slots[:half], slots, model_dir, args, t0, work),
             Pipeline("B", sched, slots[half:2 * half], slots, model_dir, args, t0, work)]
    events: list[dict[str, Any]] = []
    try:
        await asyncio.gather(*(p.start() for p in pipes))
        tasks = {p.pid: asyncio.create_task(p.run(), name=p.pid) for p in pipes}
        if args.scenario == "kill-pipeline":
            events.append(await _unless_one_fails(kill_pipeline(pipes[0], tasks["A"], sched, t0), tasks))
        elif args.scenario == "kill-replica":
            events.append(await _unless_one_fails(kill_replica(pipes[0], t0), tasks))
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for pid, res in zip(tasks, results):
            if isinstance(res, BaseException) and not (isinstance(res, asyncio.CancelledError)
                                                       and args.scenario == "kill-pipeline" and pid == "A"):
                raise res
        snap = sched.snapshot()
        sched.state.check()
        checks = reference_check(pipes)
    finally:
        closed = {p.pid: await p.close() for p in pipes}
        await sched.close()
        shutil.rmtree(work, ignore_errors=True)
    return summarize(args, pipes, sched, snap, checks, closed, events)


async def _unless_one_fails(event: Awaitable[dict[str, Any]], tasks: dict[str, asyncio.Task]) -> dict[str, Any]:
    """The scenario's event, unless a pipeline fails (or every one ends) first: then that error, at
    once (the event would otherwise wait for a window that cannot open, until its deadline)."""
    waiter = asyncio.ensure_future(event)
    running, failed = set(tasks.values()), []
    while running and not waiter.done():   # a task already done is not waited on again (no spin)
        done, running = await asyncio.wait({waiter, *running}, return_when=asyncio.FIRST_COMPLETED)
        running.discard(waiter)
        failed = [t for t in done if t is not waiter and not t.cancelled() and t.exception() is not None]
        if failed:
            break
    if not waiter.done():
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter                   # its own clean-up (HTTP clients) runs before the error goes up
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        raise RuntimeError("the pipelines ended before the scenario's event could happen")
    return waiter.result()


async def kill_pipeline(p: Pipeline, task: asyncio.Task, sched: GpuScheduler, t0: float) -> dict[str, Any]:
    """Pipeline A dies mid-rollout: its driver stops, its processes go, the scheduler forgets it.
    Mid-rollout is an engine event, not a progress report (on an idle machine a rollout's reports
    can jump from none to all): one of its replicas runs requests of its first rollout."""
    running = await _until_running(p, lambda live: len(p.steps) == 0 and any(live.values()),
                                   "a replica running requests of its first rollout")
    at = time.monotonic() - t0
    unfinished = sum(o.finish is None for o in p.in_rollout)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    closed = await p.ctrl.close(kill=True)     # its processes die with it; close() reaps and checks
    await sched.unregister_pipeline(p.pid)
    return {"event": "kill-pipeline", "pipeline": p.pid, "at_s": round(at, 3), "running_at_kill": running,
            "unfinished_at_kill": unfinished, "unregistered_s": round(time.monotonic() - t0, 3), "closed": closed}


async def kill_replica(p: Pipeline, t0: float) -> dict[str, Any]:
    """SIGKILL the server and engine of one of p's replicas while its engine runs requests and p
    has another replica serving: those requests continue there."""
    running = await _until_running(p, lambda live: len(live) >= 2 and max(live.values()) >= KILL_RUNNING,
                                   f"two replicas serving, one running >= {KILL_RUNNING} requests")
    rank = max(running, key=lambda r: (running[r], -r))
    rep = p.ctrl.replicas[rank]
    os.kill(rep.proc.pid, signal.SIGKILL)
    os.kill(rep.engine_pid, signal.SIGKILL)
    at = time.monotonic() - t0
    await asyncio.to_thread(rep.proc.wait, 10)
    return {"event": "kill-replica", "pipeline": p.pid, "rank": rank, "slot": list(rep.slot),
            "at_s": round(at, 3), "running_at_kill": running, "scheduler_at_kill": p.sched.snapshot()["generation"]}


async def _until_running(p: Pipeline, ready: Callable[[dict[int, int]], bool], what: str) -> dict[int, int]:
    """Poll the engines of p's serving replicas (GET /v1/state: num_running) until ready(running
    per rank) holds; return that reading. Bounded by p's deadline."""
    deadline = time.monotonic() + p.args.timeout
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            live = {}
            for r in sorted(p.ctrl.serving):
                rep = p.ctrl.replicas.get(r)
                if rep is None:
                    continue
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):   # one being shrunk now
                    live[r] = int((await http.get(rep.url + "/v1/state")).json()["num_running"])
            if live and ready(live) and set(live) <= p.ctrl.serving:
                return live
            await asyncio.sleep(0.01)         # polling the engines, bounded by the deadline
    raise TimeoutError(f"pipeline {p.pid} never had {what} within {p.args.timeout}s")


def summarize(args: argparse.Namespace, pipes: list[Pipeline], sched: GpuScheduler, snap: dict, checks: dict,
              closed: dict, events: list[dict]) -> dict[str, Any]:
    records = [{"pipeline": p.pid, **asdict(r)} for p in pipes for r in p.ctrl.records]
    phases: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for k, v in r["phases"].items():
            phases.setdefault(r["op"], {}).setdefault(k, []).append(v)
    table = {op: {k: {"n": len(v), "mean_s": sum(v) / len(v), "max_s": max(v)} for k, v in ph.items()}
             for op, ph in phases.items()}
    finals = {o.key: o.finals for p in pipes for o in p.outcomes}
    return {
        "scenario": args.scenario, "slots": args.slots, "steps": args.steps, "load_avg": os.getloadavg(),
        "phase_table": table, "records": records, "events": events,
        "steps_done": {p.pid: p.steps for p in pipes},
        "samples": len(finals), "final_outputs_not_one": [k for k, n in finals.items() if n != 1],
        "moved_samples": {p.pid: sum(bool(o.moved_at) for o in p.outcomes) for p in pipes},
        "resumed_samples": {p.pid: sum(bool(o.resumed_at) for o in p.outcomes) for p in pipes},
        "reference": checks, "scheduler": {"plans": snap["plans"], "broken": snap["broken"], "dead": snap["dead"],
                                           "quarantined": snap["quarantined"]},
        "closed": closed,
        "timeline": [asdict(iv) for p in pipes for iv in p.intervals()],
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {("A", "rollout"): "#4c72b0", ("A", "train"): "#1b2f5c", ("B", "rollout"): "#dd8452",
              ("B", "train"): "#7a3b12"}
    fig, ax = plt.subplots(figsize=(9, 0.55 * result["slots"] + 1.2), dpi=80)
    for iv in result["timeline"]:
        c = colors.get((iv["pipeline"], iv["stage"]), "#999999")
        ax.broken_barh([(iv["start"], max(iv["end"] - iv["start"], 0.05))], (iv["slot"] - 0.4, 0.8), color=c)
    for ev in result["events"]:
        ax.axvline(ev["at_s"], color="red", lw=1)
    ax.set_yticks(range(result["slots"]), [f"slot {s}" for s in range(result["slots"])])
    ax.set_xlabel("seconds")
    ax.set_title(f"two pipelines on {result['slots']} slots ({result['scenario']}); grey: shrink/expand handoff")
    ax.legend(handles=[Patch(color=c, label=f"{p} {s}") for (p, s), c in colors.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(f"{'op':<8}{'phase':<8}{'n':>4}{'mean s':>9}{'max s':>9}")
    for op, ph in result["phase_table"].items():
        for k, v in ph.items():
            print(f"{op:<8}{k:<8}{v['n']:>4}{v['mean_s']:>9.3f}{v['max_s']:>9.3f}")
    for pid, steps in result["steps_done"].items():
        for s in steps:
            print(f"{pid} step {s['step']}: version {s['version']} -> {s['pushed_version']}, reward "
                  f"{s['reward_mean']:.3f}, max weight change {s['max_weight_change']:.2e}")
    print("reference:", result["reference"], "| final outputs != 1:", result["final_outputs_not_one"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Two RL pipelines on real Tidal replicas (see the module docstring).")
    p.add_argument("--scenario", default="boundary", choices=SCENARIOS)
    p.add_argument("--slots", type=int, default=4, help="device slots in the pool (>= 2)")
    p.add_argument("--steps", type=int, default=3, help="rollout -> train -> push cycles per pipeline")
    p.add_argument("--prompts", type=int, default=4, help="prompts (GRPO groups) per rollout")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of every wait, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help="deadline of a replica's start, seconds")
    p.add_argument("--no-prestart", dest="prestart", action="store_false",
                   help="start each replica at its first expand instead of all at the beginning")
    p.add_argument("--out", default="benchmarks/results/pipelines_timeline.json")
    p.add_argument("--plot", default="benchmarks/results/pipelines_timeline.png")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.slots < 2:
        raise SystemExit(f"--slots = {args.slots}, expected >= 2")
    for name in ("steps", "prompts", "max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} = {getattr(args, name)}, expected >= 1")
    if args.n < 2:
        raise SystemExit(f"--n = {args.n}, expected >= 2 (group-normalised advantages need a group)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    result = asyncio.run(run(args))
    print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
