"""Simulate N RL pipelines on M GPUs, driven by the real GpuScheduler on a virtual clock.

Each pipeline repeats: generation (a rollout of `rollout_size` samples on its generation replicas)
-> reward (CPU, no GPU) -> training (its `actor_train` cluster). A replica runs up to `slots`
samples at once; a sample takes a long-tailed (log-normal) time, the same draws in every mode.
A shrink retracts the replica's samples (they keep their progress and pay `retract_s` on restart)
and holds its GPUs `offload_s`; an expand holds them `load_s` before the replica serves.

Modes: "static" gives every pipeline fixed disjoint GPUs for both training and generation;
"shared" keeps the same training GPUs but lets every pipeline generate on the whole pool. Both run
the same scheduler code and pay the same load/offload costs.

Utilization counts useful GPU time only: training GPUs while training, and a replica's GPUs
scaled by its occupancy (running samples / slots). Loading, offloading, empty slots and samples
re-running the `retract_s` a retraction cost them are waste.

One job past 400 lines: the virtual clock, the simulated pipelines and engines and the workload
matrix are the simulator's parts; none is used without the others."""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from tidal.cluster.gpu_scheduler import GpuScheduler
from tidal.cluster.planner import PlannerConfig
from tidal.cluster.types import ClusterSpec, PipelineSpec, Priority


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run."""

    def __init__(self) -> None:
        self._vtime = 0.0
        super().__init__(_JumpSelector(self))

    def time(self) -> float:
        return self._vtime


class _JumpSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop):
        super().__init__()
        self._vloop = loop

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("simulation deadlock: no timer pending and nothing ready to run")
        self._vloop._vtime += timeout
        return []


def run_virtual(coro):
    """Run a coroutine to completion on a fresh VirtualClockLoop."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass(slots=True)
class Workload:
    name: str
    rollout_size: int = 128
    train_s: float = 40.0
    reward_s: float = 15.0
    steps: int = 6
    sample_median_s: float = 8.0
    sample_sigma: float = 0.9
    sample_max_s: float = 90.0
    start_s: float = 0.0
    """When the pipeline is submitted (pipelines of one pool rarely start together)."""


@dataclass(slots=True)
class SimConfig:
    num_gpus: int = 8
    tp: int = 2
    slots: int = 32
    load_s: float = 2.0
    offload_s: float = 1.0
    retract_s: float = 0.5
    seed: int = 0
    horizon_s: float | None = None
    """If set, every pipeline keeps stepping until this time and utilization is measured over
    [last start_s, horizon_s] (steady state, no end effects); else each runs `steps` and the window
    ends at the makespan."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    declare_slots: bool = True
    """Declare `slots` to the scheduler as the generation cluster's max_num_seqs (so tails pack
    onto few replicas); False leaves it unknown, as before that field existed."""


@dataclass(slots=True)
class Segment:
    gpus: tuple[int, ...]
    pipeline: str
    phase: str  # "train" | "gen" | "load" | "offload"
    start: float
    end: float = math.nan
    occupancy: float = 1.0


@dataclass(slots=True)
class SimResult:
    mode: str
    num_gpus: int
    makespan_s: float
    window_s: float
    step_times: dict[str, list[float]]
    waits: dict[str, float]
    segments: list[Segment]
    plans: int
    window_start_s: float = 0.0
    """The measured window is [window_start_s, window_s]: from the last pipeline's start on, so a
    pool that is not yet fully subscribed does not count against either mode."""

    def _gpu_s(self, weight) -> float:
        """GPU-seconds inside [window_start_s, window_s], each segment weighted by weight(segment)."""
        total = 0.0
        for s in self.segments:
            dt = min(s.end, self.window_s) - max(s.start, self.window_start_s)
            if dt > 0:
                total += dt * len(s.gpus) * weight(s)
        return total / (self.num_gpus * (self.window_s - self.window_start_s))

    @property
    def utilization(self) -> float:
        """Useful: training GPUs, and generation GPUs scaled by occupancy (running / slots)."""
        return self._gpu_s(lambda s: 1.0 if s.phase == "train" else s.occupancy if s.phase == "gen" else 0.0)

    @property
    def busy(self) -> float:
        """What nvidia-smi would call utilization: training, or a replica running >= 1 sample."""
        return self._gpu_s(lambda s: float(s.phase == "train" or (s.phase == "gen" and s.occupancy > 0)))

    @property
    def allocated(self) -> float:
        """Held by some pipeline in any phase, loading and offloading included."""
        return self._gpu_s(lambda s: 1.0)

    def mean_step(self, pipeline: str) -> float:
        return sum(self.step_times[pipeline]) / len(self.step_times[pipeline])

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "makespan_s": round(self.makespan_s, 2),
            "utilization": round(self.utilization, 4),
            "busy": round(self.busy, 4),
            "allocated": round(self.allocated, 4),
            "mean_step_s": {p: round(self.mean_step(p), 2) for p in self.step_times},
            "wait_s": {p: round(w, 2) for p, w in self.waits.items()},
            "plans": self.plans,
        }


class Recorder:
    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def open(self, gpus: tuple[int, ...], pipeline: str, phase: str) -> Segment:
        seg = Segment(gpus, pipeline, phase, asyncio.get_running_loop().time())
        self.segments.append(seg)
        return seg

    @staticmethod
    def close(seg: Segment) -> None:
        seg.end = asyncio.get_running_loop().time()


@dataclass(slots=True)
class _Sample:
    left: float
    redo: float = 0.0
    """Seconds of `left` that re-run retracted work (a restart's cost): running, but not useful."""


class SimEngine:
    """A pipeline's generation replicas; implements GenerationController for the scheduler."""

    def __init__(self, name: str, spec: ClusterSpec, cfg: SimConfig, rec: Recorder):
        self.name, self.spec, self.cfg, self.rec = name, spec, cfg, rec
        self.up: dict[int, list[_Sample]] = {}
        self.segs: dict[int, Segment] = {}
        self.queue: deque[_Sample] = deque()
        self.done = 0
        self.t_last = 0.0
        self._poke: asyncio.Future | None = None

    async def shrink(self, ranks: list[int]) -> None:
        self._advance()
        for r in ranks:
            for s in self.up.pop(r):
                s.left += self.cfg.retract_s
                s.redo += self.cfg.retract_s
                self.queue.appendleft(s)
            self._segment(r, "offload")
        self._dispatch()
        await asyncio.sleep(self.cfg.offload_s)
        for r in ranks:
            Recorder.close(self.segs.pop(r))

    async def expand(self, ranks: list[int]) -> None:
        for r in ranks:
            self._segment(r, "load")
        await asyncio.sleep(self.cfg.load_s)
        self._advance()
        for r in ranks:
            self.up[r] = []
            self._segment(r, "gen", 0.0)
        self._dispatch()

    async def rollout(self, durations: list[float], report) -> None:
        self._advance()
        self.queue.extend(_Sample(d) for d in durations)
        self.done = 0
        self._dispatch()
        target = len(durations)
        while self.done < target:
            # wake when a sample finishes or stops re-running retracted work (its occupancy counts again)
            running = [s.redo if s.redo > 1e-9 else s.left for run in self.up.values() for s in run]
            self._poke = asyncio.get_running_loop().create_future()
            timeout = min(running) if running else None
            await asyncio.wait({self._poke}, timeout=timeout)
            self._advance()
            before = self.done
            self._dispatch()
            if self.done != before:
                report(self.done)

    def _advance(self) -> None:
        now = asyncio.get_running_loop().time()
        dt, self.t_last = now - self.t_last, now
        if dt > 0:
            for run in self.up.values():
                for s in run:
                    s.left -= dt
                    s.redo = max(0.0, s.redo - dt)

    def _dispatch(self) -> None:
        """Retire finished samples, fill free slots least-loaded replica first, and log occupancy."""
        for run in self.up.values():
            keep = [s for s in run if s.left > 1e-9]
            self.done += len(run) - len(keep)
            run[:] = keep
        for r in sorted(self.up, key=lambda r: len(self.up[r])):
            run = self.up[r]
            while self.queue and len(run) < self.cfg.slots:
                run.append(self.queue.popleft())
        for r, run in self.up.items():
            occ = sum(1 for s in run if s.redo <= 1e-9) / self.cfg.slots
            if self.segs[r].occupancy != occ:
                self._segment(r, "gen", occ)
        if self._poke is not None and not self._poke.done():
            self._poke.set_result(None)

    def _segment(self, rank: int, phase: str, occupancy: float = 1.0) -> None:
        old = self.segs.pop(rank, None)
        if old is not None:
            Recorder.close(old)
        seg = self.rec.open(self.spec.replica(rank), self.name, phase)
        seg.occupancy = occupancy
        self.segs[rank] = seg


def layout(workloads: list[Workload], cfg: SimConfig, mode: str) -> list[PipelineSpec]:
    """Static: pipeline i owns GPUs [i*k, (i+1)*k) for everything. Shared: same training GPUs,
    generation over the whole pool."""
    k = cfg.num_gpus // len(workloads)
    if k < cfg.tp or k % cfg.tp:
        raise ValueError(
            f"num_gpus={cfg.num_gpus} over {len(workloads)} pipelines gives {k} GPUs each, "
            f"expected a positive multiple of tp={cfg.tp}"
        )
    specs = []
    for i, w in enumerate(workloads):
        own = list(range(i * k, (i + 1) * k))
        gen = own if mode == "static" else list(range(cfg.num_gpus))
        specs.append(
            PipelineSpec(
                w.name,
                clusters={
                    "actor_train": ClusterSpec(gpus=tuple(own)),
                    "actor_infer": ClusterSpec(
                        gpus=tuple(gen),
                        tp=cfg.tp,
                        generation=True,
                        max_num_seqs=cfg.slots if cfg.declare_slots else None,
                    ),
                },
            )
        )
    return specs


def rollouts(w: Workload, cfg: SimConfig, index: int) -> Iterator[list[float]]:
    """Pipeline `index`'s sample durations, one list per step: the same draws in every mode."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    while True:
        yield [
            min(w.sample_max_s, w.sample_median_s * math.exp(rng.gauss(0.0, w.sample_sigma)))
            for _ in range(w.rollout_size)
        ]


def simulate(workloads: list[Workload], cfg: SimConfig | None = None, mode: str = "shared") -> SimResult:
    cfg = cfg or SimConfig()
    if mode not in ("static", "shared"):
        raise ValueError(f"mode={mode!r}: expected 'static' or 'shared'")
    return run_virtual(_simulate(workloads, cfg, mode))


async def _simulate(workloads: list[Workload], cfg: SimConfig, mode: str) -> SimResult:
    rec = Recorder()
    sched = GpuScheduler(cfg.num_gpus, cfg.planner, default_timeout_s=1e6, controller_timeout_s=1e4)
    step_times: dict[str, list[float]] = {}
    waits: dict[str, float] = {}
    engines: dict[str, SimEngine] = {}
    for spec in layout(workloads, cfg, mode):
        engine = engines[spec.pipeline_id] = SimEngine(spec.pipeline_id, spec.clusters["actor_infer"], cfg, rec)
        await sched.register_pipeline(spec, generation=engine)
    loop = asyncio.get_running_loop()

    async def waited(pid: str, aw):
        t0 = loop.time()
        out = await aw
        waits[pid] = waits.get(pid, 0.0) + loop.time() - t0
        return out

    async def pipeline(i: int, w: Workload) -> None:
        pid = w.name
        engine = engines[pid]
        draws = rollouts(w, cfg, i)
        times = step_times.setdefault(pid, [])
        step = 0
        await asyncio.sleep(w.start_s)
        while (loop.time() < cfg.horizon_s) if cfg.horizon_s is not None else step < w.steps:
            t0 = loop.time()
            durations = next(draws)
            if step == 0:
                await waited(
                    pid, sched.request_gpus(pid, "actor_infer", Priority.GENERATION, step_target=w.rollout_size)
                )
            else:
                await waited(
                    pid,
                    sched.release_then_request(
                        pid,
                        release="actor_train",
                        request="actor_infer",
                        priority=Priority.GENERATION,
                        step_target=w.rollout_size,
                    ),
                )
            await engine.rollout(durations, lambda done: sched.report_progress(pid, done))
            await waited(pid, sched.release_gpus(pid, "actor_infer"))
            await asyncio.sleep(w.reward_s)
            gpus = await waited(pid, sched.request_gpus(pid, "actor_train", Priority.ACTOR_TRAINING))
            seg = rec.open(tuple(gpus), pid, "train")
            await asyncio.sleep(w.train_s)
            Recorder.close(seg)
            times.append(loop.time() - t0)
            step += 1
        await sched.release_gpus(pid, "actor_train")

    await asyncio.gather(*(pipeline(i, w) for i, w in enumerate(workloads)))
    makespan = loop.time()
    await sched.close()
    window = cfg.horizon_s if cfg.horizon_s is not None else makespan
    return SimResult(
        mode,
        cfg.num_gpus,
        makespan,
        window,
        step_times,
        waits,
        rec.segments,
        sched.plans,
        window_start_s=max(w.start_s for w in workloads),
    )


# ---- the fluid upper bound --------------------------------------------------------------------
# Derivation: docs/architecture.md, "The planner and its bound". In short: relax the pool to a fluid
# (a pipeline may generate on any fraction of it, handoffs are free, nothing is retracted) and bound
# each pipeline alone by its fastest possible run, then the pool by its capacity.


@dataclass(slots=True)
class _Curve:
    """Cumulative useful GPU-seconds of back-to-back phases: linear through (times[i], work[i]),
    flat after the last point."""

    times: list[float]
    work: list[float]

    @classmethod
    def of(cls, pieces: list[tuple[float, float]]) -> _Curve:
        times, work = [0.0], [0.0]
        for seconds, gpus in pieces:
            times.append(times[-1] + seconds)
            work.append(work[-1] + seconds * gpus)
        return cls(times, work)

    def at(self, t: float) -> float:
        i = bisect_right(self.times, t) - 1
        if i < 0:
            return 0.0
        if i >= len(self.times) - 1:
            return self.work[-1]
        t0, t1 = self.times[i], self.times[i + 1]
        return self.work[i] + (self.work[i + 1] - self.work[i]) * (t - t0) / (t1 - t0)

    def window_max(self, span: float, last_start: float) -> float:
        """Most work in any [x, x + span] with 0 <= x <= last_start. The work is piecewise linear in
        x, so its maximum sits where x or x + span is a breakpoint."""
        xs = {0.0, last_start}
        xs.update(x for x in self.times if x <= last_start)
        xs.update(x - span for x in self.times if 0.0 <= x - span <= last_start)
        return max(self.at(x + span) - self.at(x) for x in xs)


def _phases(
    steps: list[tuple[float, float]], pool: float, train_gpus: int, w: Workload, squeeze_first: bool = False
) -> list[tuple[float, float]]:
    """(seconds, GPUs doing useful work) of each phase of the fastest run through `steps`: a rollout
    of work W at the whole pool for W/pool s, then idle until its longest sample is done (g), then
    the reward (no GPU), then training. squeeze_first: the first rollout is already under way and
    its remaining work needs no more than the pool's time."""
    out: list[tuple[float, float]] = []
    for i, (work, g) in enumerate(steps):
        out.append((work / pool, pool))
        if not (squeeze_first and i == 0):
            out.append((g - work / pool, 0.0))
        out += [(w.reward_s, 0.0), (w.train_s, float(train_gpus))]
    return out


def _pipeline_bound(
    w: Workload, cfg: SimConfig, index: int, pool: float, train_gpus: int, window: tuple[float, float]
) -> float:
    """Most useful GPU-seconds pipeline `index` can do inside `window`, whatever the others do."""
    a, end = window
    steps: list[tuple[float, float]] = []
    starts, t = [], 0.0  # when each step's rollout starts in the fastest run (from w.start_s)
    draws = rollouts(w, cfg, index)
    while t < end - w.start_s and (cfg.horizon_s is not None or len(steps) < w.steps):
        d = next(draws)
        work = sum(d) * cfg.tp / cfg.slots
        steps.append((work, max(max(d), work / pool)))
        starts.append(t)
        t += steps[-1][1] + w.reward_s + w.train_s
    # everything it can do from its start to the window's end ...
    best = _Curve.of(_phases(steps, pool, train_gpus, w)).at(end - w.start_s)
    # ... and, starting late, what it can do from whatever step it is in at the window's start
    # (no further than the fastest run's; anywhere inside that step's rollout, reward or training)
    late = 0.0
    for j, t0 in enumerate(starts):
        if t0 > a - w.start_s:
            break
        curve = _Curve.of(_phases(steps[j:], pool, train_gpus, w, squeeze_first=True))
        late = max(late, curve.window_max(end - a, curve.times[3]))
    return min(best, late)


def bound_window(workloads: list[Workload], cfg: SimConfig, window: tuple[float, float] | None) -> tuple[float, float]:
    """The window a bound is taken over: `window`, or [the last pipeline's start, the horizon]."""
    if window is None:
        if cfg.horizon_s is None:
            raise ValueError("window=None needs SimConfig.horizon_s, expected a (start, end) window otherwise")
        window = (max(w.start_s for w in workloads), cfg.horizon_s)
    if not window[1] > window[0]:
        raise ValueError(f"window={window!r}: expected start < end")
    return window


def fluid_bound(
    workloads: list[Workload], cfg: SimConfig, mode: str = "shared", window: tuple[float, float] | None = None
) -> float:
    """An upper bound on `SimResult.utilization` over `window` (default: [last start, horizon]) for
    every scheduler: each pipeline's useful work is capped by its fastest possible run on a fluid
    pool (the whole pool in "shared" mode, its own GPUs in "static"), the sum by the pool."""
    window = bound_window(workloads, cfg, window)
    a, end = window
    k = cfg.num_gpus // len(workloads)
    pool = float(cfg.num_gpus if mode == "shared" else k)
    capacity = cfg.num_gpus * (end - a)
    work = sum(_pipeline_bound(w, cfg, i, pool, k, window) for i, w in enumerate(workloads))
    return min(capacity, work) / capacity


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs else 1.0


def compare(workloads: list[Workload], cfg: SimConfig | None = None) -> dict:
    cfg = cfg or SimConfig()
    static, shared = simulate(workloads, cfg, "static"), simulate(workloads, cfg, "shared")
    from tidal.cluster.bound import switch_bound  # it builds on this module's workload draws

    ratios = {p: shared.mean_step(p) / static.mean_step(p) for p in static.step_times}
    window = (shared.window_start_s, shared.window_s)
    fluid = fluid_bound(workloads, cfg, "shared", window)
    bound = min(fluid, switch_bound(workloads, cfg, "shared", window))
    return {
        "static": static,
        "shared": shared,
        "utilization_ratio": shared.utilization / static.utilization,
        "bound": bound,
        "bound_ratio": bound / static.utilization,
        "of_bound": shared.utilization / bound,
        "fluid_bound": fluid,
        "of_fluid_bound": shared.utilization / fluid,
        "makespan_ratio": shared.makespan_s / static.makespan_s,
        "step_time_ratio": ratios,
        "fairness": jain([1 / r for r in ratios.values()]),
    }


def plot_timeline(results: list[SimResult], path: str) -> None:
    """One panel per result: a row per GPU, colored by pipeline, shaded by phase and occupancy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = sorted({s.pipeline for r in results for s in r.segments})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(names)}
    hatch = {"train": "", "gen": "", "load": "///", "offload": "\\\\\\"}
    fig, axes = plt.subplots(
        len(results), 1, figsize=(14, 2.2 + 0.45 * results[0].num_gpus * len(results)), sharex=True, squeeze=False
    )
    for ax, r in zip(axes[:, 0], results):
        for s in r.segments:
            alpha = 0.95 if s.phase == "train" else 0.25 + 0.6 * s.occupancy if s.phase == "gen" else 0.35
            for g in s.gpus:
                ax.broken_barh(
                    [(s.start, s.end - s.start)],
                    (g - 0.4, 0.8),
                    facecolors=colors[s.pipeline],
                    alpha=alpha,
                    hatch=hatch[s.phase],
                    edgecolor="black" if s.phase == "train" else None,
                    linewidth=0.3,
                )
        ax.set_yticks(range(r.num_gpus))
        ax.set_ylabel("GPU")
        ax.invert_yaxis()
        if r.window_s < r.makespan_s:
            ax.axvline(r.window_s, color="black", linestyle="--", linewidth=1)
        if r.window_start_s > 0:
            ax.axvline(r.window_start_s, color="black", linestyle="--", linewidth=1)
        ax.set_title(
            f"{r.mode}: useful utilization {r.utilization:.0%} over [{r.window_start_s:.0f}, "
            f"{r.window_s:.0f}]s, "
            f"busy {r.busy:.0%}"
        )
    axes[-1, 0].set_xlabel("time (s, virtual)")
    handles = [Patch(color=colors[p], label=p) for p in names]
    handles += [
        Patch(facecolor="grey", alpha=0.95, edgecolor="black", label="train"),
        Patch(facecolor="grey", alpha=0.6, label="generate (shade = occupancy)"),
        Patch(facecolor="white", hatch="///", edgecolor="grey", label="load"),
        Patch(facecolor="white", hatch="\\\\\\", edgecolor="grey", label="offload"),
    ]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
