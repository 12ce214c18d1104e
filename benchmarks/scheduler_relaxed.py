"""How close can any schedule of the scheduler benchmark's workloads come to the fluid bound?

`tidal.cluster.sim.fluid_bound` lets the pool be shared at any ratio at every instant, so where the
pipelines' demand at full speed exceeds the pool (agentic: 8.28 GPUs of demand on 8) it is the
capacity, 1.0, even when the pipelines' phases cannot be arranged to keep the pool busy. This
script searches schedules of a *relaxed* model of the same pipelines, easier than the simulator in
every respect the planner pays for:

- the pool is a fluid: a rollout's work W (its seed's sample seconds x tp / slots, the simulator's
  draws) runs at the whole generation capacity, 8 GPUs less k for each pipeline training;
- no empty slots (no tails, no longest-sample limit), no retraction, and load + offload only as a
  delay of the pipeline's next phase (the GPUs stay usable by the others meanwhile);
- the schedule is clairvoyant: it knows every rollout's work and every pipeline's env and
  training time.

Not for long-tail: its rollouts are bounded by their longest sample (90 s), which this model drops,
so there the fluid bound (0.696) is far below what the model allows; it is left out of the table.

A schedule is the order the server takes the ready rollouts in (one at a time at the whole
capacity: in the fluid model serving two at once only delays the first one's end). Searched:
fewest-remaining-first (the default planner's order), most-remaining-first, shortest-cycle-first,
every fixed priority order of the pipelines, --random random choice sequences and a hill climb from
the best of them. The best found is an achievable utilization of the relaxed model, not a bound:
a better schedule may exist. It is evidence of how much of the fluid bound's gap is the phases of
the pipelines themselves (every pipeline in env/train at once), which no planner removes.

    python benchmarks/scheduler_relaxed.py [--random 4000] [--seeds 0]

Prints a table; writes scheduler_relaxed.json into benchmarks/results/local/ (--publish: results/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.outdir import add_publish_flag, results_dir  # noqa: E402
from benchmarks.scheduler import WORKLOADS, workloads  # noqa: E402
from tidal.cluster.sim import SimConfig, Workload, fluid_bound, rollouts  # noqa: E402

# choose(ready pipelines, decision number, remaining work per pipeline) -> the one to serve
Chooser = Callable[[list[int], int, list[float]], int]


def relaxed_utilization(ws: list[Workload], cfg: SimConfig, choose: Chooser) -> tuple[float, list[int]]:
    """Useful utilization over [last start, horizon] of the relaxed model under `choose`, and the
    number of rollouts each pipeline finished."""
    n, pool = len(ws), cfg.num_gpus
    k = cfg.num_gpus // n
    assert cfg.horizon_s is not None
    a, end = max(w.start_s for w in ws), cfg.horizon_s
    draws = [rollouts(w, cfg, i) for i, w in enumerate(ws)]
    work = [lambda i=i: sum(next(draws[i])) * cfg.tp / cfg.slots for i in range(n)]
    delay = cfg.load_s + cfg.offload_s
    # phase of each pipeline: "wait" (not started), "gen" (ready or served), "env", "train"
    phase, left = ["wait"] * n, [w.start_s for w in ws]
    done, t, useful, serving, decisions = [0] * n, 0.0, 0.0, None, 0
    while t < end:
        for i in range(n):  # phase changes due now
            if left[i] <= 1e-9:
                if phase[i] in ("wait", "train"):
                    done[i] += phase[i] == "train"
                    phase[i], left[i] = "gen", work[i]()
                elif phase[i] == "gen":
                    phase[i], left[i], serving = "env", ws[i].reward_s + delay, None
                elif phase[i] == "env":
                    phase[i], left[i] = "train", ws[i].train_s
        ready = [i for i in range(n) if phase[i] == "gen"]
        if serving is None and ready:
            serving = choose(ready, decisions, left)
            decisions += 1
        training = sum(p == "train" for p in phase)
        cap = pool - k * training
        dt = min([end - t] + [left[i] for i in range(n) if phase[i] != "gen"]
                 + ([left[serving] / cap] if serving is not None else []))
        inside = max(0.0, min(t + dt, end) - max(t, a))
        useful += (k * training + (cap if serving is not None else 0)) * inside
        for i in range(n):
            if phase[i] != "gen":
                left[i] -= dt
        if serving is not None:
            left[serving] -= cap * dt
        t += dt
    return useful / (pool * (end - a)), done


def search(ws: list[Workload], cfg: SimConfig, random_tries: int, seed: int = 0) -> dict:
    """Utilization of each rule and the best schedule found (by rule, random sequences, hill climb)."""
    cycle = [w.reward_s + w.train_s + sum(next(rollouts(w, cfg, i))) * cfg.tp / cfg.slots / cfg.num_gpus
             for i, w in enumerate(ws)]
    rules: dict[str, Chooser] = {
        "fewest remaining first": lambda r, d, left: min(r, key=lambda i: (left[i], i)),
        "most remaining first": lambda r, d, left: max(r, key=lambda i: (left[i], -i)),
        "shortest cycle first": lambda r, d, left: min(r, key=lambda i: (cycle[i], i)),
    }
    for order in itertools.permutations(range(len(ws))):
        rules[f"fixed order {''.join(map(str, order))}"] = lambda r, d, left, o=order: min(r, key=o.index)
    results = {name: relaxed_utilization(ws, cfg, rule) for name, rule in rules.items()}
    best_name = max(results, key=lambda name: results[name][0])
    best = dict(util=results[best_name][0], steps=results[best_name][1], how=best_name)
    rng = random.Random(seed)

    def by_sequence(seq: list[int]) -> Chooser:
        return lambda r, d, left: r[seq[d % len(seq)] % len(r)]

    best_seq, seq_util = None, -1.0  # the best random sequence, where the hill climb starts
    for _ in range(random_tries):
        seq = [rng.randrange(24) for _ in range(128)]
        u, steps = relaxed_utilization(ws, cfg, by_sequence(seq))
        if u > seq_util:
            best_seq, seq_util = seq, u
        if u > best["util"]:
            best = dict(util=u, steps=steps, how="random sequence")
    if best_seq is not None:  # hill climb: change one decision at a time
        for _ in range(random_tries // 4):
            seq = list(best_seq)
            seq[rng.randrange(len(seq))] = rng.randrange(24)
            u, steps = relaxed_utilization(ws, cfg, by_sequence(seq))
            if u > seq_util:
                best_seq, seq_util = seq, u
            if u > best["util"]:
                best = dict(util=u, steps=steps, how="hill climb")
    return dict(rules={name: dict(util=round(u, 4), steps=s) for name, (u, s) in results.items()},
                best=dict(best, util=round(best["util"], 4)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=4000, help="random choice sequences per workload")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="the simulator's sample-draw seeds")
    add_publish_flag(ap)
    args = ap.parse_args()
    rows = []
    print("| workload | seed | fluid bound | fewest remaining first | best rule | best found | how | "
          "best found / fluid bound | rollouts per pipeline (best) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in (k for k in WORKLOADS if k != "long-tail"):
        for seed in args.seeds:
            cfg = SimConfig(num_gpus=8, tp=1, slots=16, horizon_s=2000.0, seed=seed)
            ws = workloads(kind)
            t0 = time.perf_counter()
            found = search(ws, cfg, args.random, seed)
            fluid = fluid_bound(ws, cfg, "shared")
            rule = max(found["rules"], key=lambda name: found["rules"][name]["util"])
            best = found["best"]
            rows.append(dict(workload=kind, seed=seed, fluid_bound=round(fluid, 4), random_tries=args.random,
                             wall_s=round(time.perf_counter() - t0, 1), **found))
            print(f"| {kind} | {seed} | {fluid:.3f} | {found['rules']['fewest remaining first']['util']:.3f} | "
                  f"{found['rules'][rule]['util']:.3f} ({rule}) | {best['util']:.3f} | {best['how']} | "
                  f"{best['util'] / fluid:.1%} | {best['steps']} |", flush=True)
    out = results_dir(args.publish) / "scheduler_relaxed.json"
    out.write_text(json.dumps(dict(random_tries=args.random, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
