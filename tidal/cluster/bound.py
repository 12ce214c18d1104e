"""The switch-cost bound: an upper bound on `SimResult.utilization` for every planner, tighter than
`sim.fluid_bound` because it charges the costs of the simulator's protocol that no planner avoids.

Derivation (also in docs/architecture.md, "The planner and its bound"). Take the simulated system
on M GPUs, window [a, T], capacity C = M (T - a); pipeline p has k training GPUs, generation pool
P (M shared, k static), replicas of tp GPUs, S slots each, and per step s a rollout of useful work
W_s = (sum of sample seconds) tp / S whose longest sample is d_s.

1. The rollout phase of a step (from the generation request to `release_gpus` returning) lasts at
   least load + R_s + offload: the pipeline's replicas are all shrunk at every release, so its
   first sample cannot run before some replica has loaded (load s), and `release_gpus` returns
   only once the shrink is done (offload s). R_s, from the first sample's start to the last
   sample's end, is at least g_s = max(d_s, W_s / P).
2. Every replica expansion used by step s holds tp GPUs for load s before it serves and offload s
   after, inside that rollout phase, and does at most tp x (its serving time <= R_s) useful work.
   So step s needs n_s >= W_s / (tp R_s) expansions and costs w_s >= n_s c GPU-seconds of
   loading and offloading, c = (load + offload) tp: fewer replicas cost less but make R_s longer.
   Only the integer n matters: for a given n the shortest span is R(n) = max(g_s, W_s / (tp n)).
3. Segments never overlap on a GPU, so useful work u and switch cost w (both inside the window)
   satisfy sum_p (u_p + w_p) <= C. For any lambda in [0, 1), mu = lambda / (1 - lambda):
   sum_p u_p <= lambda C + (1 - lambda) sum_p max over runs of p of (u_p - mu w_p),
   and the per-pipeline maxima decouple. The right side is a maximum of functions linear in
   lambda, hence convex: a ternary search finds its minimum; lambda = 0 is the fluid bound with
   the longer phases of 1., lambda -> 1 the capacity.
4. One pipeline's max of u - mu w over its runs: relax its run to steps of phases load, a span of
   R(n) in which W_s is done at rate <= P anywhere, offload, reward (no GPU), training (k GPUs),
   with any idle time between steps, n chosen per step. The work a step does in the window is then
   at most min(W_s, P x overlap of its span) + k x overlap of its training; w_s is charged only
   for a step whose whole rollout phase lies in the window. A dynamic program over step start
   times on a grid of delta seconds takes the best: a run's true start y lies in the cell [x, x +
   delta) of its grid start x, so each overlap is measured over [x, x + length + delta], w_s only
   charged when [x, x + delta + phase] is inside, the next step starts at the cell of x + step
   time or later (idling is allowed, so the value is non-increasing in x): every quantity is
   rounded the way that can only raise the bound.

It does not charge empty slots (a replica may be full until its last sample ends) nor the
first-come dispatch of unknown-length samples: a clairvoyant dispatcher could avoid both.
"""

from __future__ import annotations

import math

import numpy as np

from tidal.cluster.sim import SimConfig, Workload, bound_window, rollouts


def switch_bound(
    workloads: list[Workload],
    cfg: SimConfig,
    mode: str = "shared",
    window: tuple[float, float] | None = None,
    grid: int = 4000,
) -> float:
    """An upper bound on `SimResult.utilization` over `window` (default: [last start, horizon])
    for every planner, charging the load/offload every rollout must pay (module docstring)."""
    if mode not in ("static", "shared"):
        raise ValueError(f"mode={mode!r}: expected 'static' or 'shared'")
    window = bound_window(workloads, cfg, window)
    a, end = window
    if not isinstance(grid, int) or grid < 10:
        raise ValueError(f"grid={grid!r}: expected an int >= 10 (cells over the window's end)")
    k = cfg.num_gpus // len(workloads)
    pool = float(cfg.num_gpus if mode == "shared" else k)
    capacity = cfg.num_gpus * (end - a)
    dps = [_PipelineDP(w, cfg, i, pool, k, window, end / grid) for i, w in enumerate(workloads)]

    def f(lam: float) -> float:
        mu = lam / (1.0 - lam)
        return lam * capacity + (1.0 - lam) * sum(dp.best(mu) for dp in dps)

    lo, hi = 0.0, 1.0 - 1e-6
    best = min(capacity, f(0.0))
    for _ in range(40):  # f is convex in lambda
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        f1, f2 = f(m1), f(m2)
        best = min(best, f1, f2)
        if f1 <= f2:
            hi = m2
        else:
            lo = m1
    return best / capacity


class _PipelineDP:
    """max over one pipeline's relaxed runs of (useful - mu x switch cost) inside the window."""

    def __init__(
        self, w: Workload, cfg: SimConfig, index: int, pool: float, k: int, window: tuple[float, float], delta: float
    ):
        a, end = window
        self.a, self.end, self.delta = a, end, delta
        self.cells = int(math.ceil(end / delta)) + 1
        self.x = np.arange(self.cells) * delta  # grid start times of a step
        self.start_cell = int(w.start_s // delta)
        self.cost = (cfg.load_s + cfg.offload_s) * cfg.tp
        # per step, per replica count n: (n, work in window, switch cost charged, next cell) by start cell
        self.steps: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = []
        draws = rollouts(w, cfg, index)
        t = w.start_s
        while t < end and (cfg.horizon_s is not None or len(self.steps) < w.steps):
            d = next(draws)
            work = sum(d) * cfg.tp / cfg.slots
            g = max(max(d), work / pool)
            options = []
            for n in range(1, max(1, math.ceil(work / (cfg.tp * g) - 1e-9)) + 1):
                span = max(g, work / (cfg.tp * n))
                phase = cfg.load_s + span + cfg.offload_s
                step = phase + w.reward_s + w.train_s
                ro = self.x + cfg.load_s
                got = np.minimum(work, pool * self._overlap(ro, span))
                got = got + k * self._overlap(self.x + phase + w.reward_s, w.train_s)
                inside = (self.x >= a) & (self.x + delta + phase <= end)
                nxt = np.minimum(np.floor((self.x + step) / delta).astype(np.int64), self.cells)
                options.append((n, got, inside, nxt))
            self.steps.append(options)
            t += cfg.load_s + g + cfg.offload_s + w.reward_s + w.train_s

    def _overlap(self, start: np.ndarray, length: float) -> np.ndarray:
        """Upper bound on |[y, y + length] & window| for every y in [start, start + delta)."""
        lo = np.maximum(start, self.a)
        hi = np.minimum(start + length + self.delta, self.end)
        return np.clip(hi - lo, 0.0, length)

    def best(self, mu: float) -> float:
        after = np.zeros(self.cells + 1)  # value from a cell on, once no step is left
        for options in reversed(self.steps):
            here = np.zeros(self.cells)  # stopping is a (relaxed) run too
            for n, got, inside, nxt in options:
                np.maximum(here, got - mu * self.cost * n * inside + after[nxt], out=here)
            # idling: a step may start at any later cell
            after = np.append(np.maximum.accumulate(here[::-1])[::-1], 0.0)
        return float(after[self.start_cell])
