"""The planner: a pure, deterministic function from scheduler state to a Plan.

1. Training-side requests, by (priority, arrival). A request whose GPUs are all idle is granted.
   One whose GPUs hold no training-side allocation but some generation replicas preempts them
   (shrink now, grant in a later plan once they are gone). One blocked by a training-side
   allocation waits, and reserves its GPUs against lower-priority requests.
2. Generation replicas of released pipelines are shrunk.
3. Gap-ratio split of generation GPUs. Inside each group of pipelines whose generation clusters
   overlap, every pipeline with open demand wants a share of the usable GPUs proportional to
   remaining samples x tp (water-filled against what its cluster can place). Receivers are served
   most-starved first: a pipeline with no replica first (min-one guarantee), then the largest
   deficit. A receiver takes an idle replica if there is one; otherwise it takes replicas from
   donors with the most negative gap, never below one replica for a donor with open demand, not
   from donors close to finishing, and only when both sides are more than `0.5 + hysteresis`
   replicas off target, so a move never invites the reverse move. Idle GPUs left over go to
   whoever can use them (work conservation). Above a floor (`guarantee`), the share is split by
   `surplus`: the gap ratio, fewest remaining samples first, or most completed samples first.

One job past 400 lines: one planning pass and the donor/receiver search it runs, kept together so
the pass reads top to bottom."""

from __future__ import annotations

import heapq
from collections.abc import Generator
from dataclasses import dataclass
from enum import IntEnum

from tidal.cluster.state import Generation, GpuRequest, Plan, SchedulerState
from tidal.cluster.types import ClusterSpec


class Slot(IntEnum):
    """What one GPU is to the planner during a plan (its `mark`)."""

    FREE = 0  # idle now
    HELD = 1  # training-side allocation (or granted in this plan)
    BLOCKED = 2  # wanted by a request that is preempting generation: no new replica may land here
    SETTLED = 3  # an active replica not in flight: a possible donor
    BUSY = 4  # in flight (shrinking / expanding) or claimed by an expansion of this plan
    HANDOFF = 5  # freed by a shrink of this plan: an expansion may claim it, a grant may not (not idle yet)


# plain ints in `mark` (a bytearray) and the hot loops; Slot(mark[g]) names one
FREE, HELD, BLOCKED, SETTLED, BUSY, HANDOFF = map(int, Slot)


SURPLUS = ("proportional", "shortest_first", "most_done_first")


@dataclass(slots=True, frozen=True)
class PlannerConfig:
    hysteresis: float = 0.25
    """Replicas of slack beyond 0.5 that both receiver and donor must be off target to move one."""
    protect_fraction: float = 0.05
    """Open pipelines with remaining <= this fraction of step_target are not shrunk to rebalance."""
    guarantee: float = 0.5
    """Floor on each open pipeline's share, as a fraction of an equal split of its group's usable
    generation GPUs among the group's pipelines (capped by its remaining samples). 0 = pure gap
    ratio; 1 = never below what a static equal split would give it while it generates. The default
    half floor lets shortest-first stagger the pipelines' phases (benchmarks/scheduler.py: the best
    worst-workload fraction of the fluid bound of the configurations measured)."""
    surplus: str = "shortest_first"
    """How GPUs above the floors are split: "proportional" to remaining x tp (the gap ratio),
    "shortest_first" (fewest remaining samples first, each up to one replica per sample), which
    staggers pipelines' phases instead of making their rollouts finish together, or
    "most_done_first" (most completed samples of the current rollout first): a rollout under way
    keeps its GPUs when another opens, which staggers further (fewer idle gaps while every pipeline
    is in env/train) at a cost in fairness: a small rollout waits on its floor behind a large one
    (benchmarks/README.md, Scheduler)."""

    def __post_init__(self) -> None:
        if self.surplus not in SURPLUS:
            raise ValueError(f"surplus={self.surplus!r}: expected one of {', '.join(map(repr, SURPLUS))}")
        if not 0.0 <= self.guarantee <= 1.0:
            raise ValueError(f"guarantee={self.guarantee!r}: expected a fraction in [0, 1]")


def plan(state: SchedulerState, config: PlannerConfig = PlannerConfig()) -> Plan:
    return _Planner(state, config).run()


class _Planner:
    def __init__(self, state: SchedulerState, config: PlannerConfig):
        self.state = state
        self.cfg = config
        n = state.num_gpus
        self.mark = bytearray(n)
        self.owner: list[tuple[str, int] | None] = [None] * n
        self.reserved = bytearray(n)
        self.gens: dict[str, Generation] = {}
        self.shrinks: dict[str, set[int]] = {}
        self.expands: dict[str, set[int]] = {}
        self.handoff: set[int] = set()  # GPUs marked HANDOFF
        for pid, ps in state.pipelines.items():
            if ps.dead is not None:
                continue
            for gpus in ps.held.values():
                for g in gpus:
                    self.mark[g] = HELD
            gen = ps.gen
            if gen is None:
                continue
            self.gens[pid] = gen
            for r in gen.active:
                for g in gen.spec.replica(r):
                    self.mark[g] = SETTLED
                    self.owner[g] = (pid, r)
            for r in gen.shrinking | gen.expanding:
                for g in gen.spec.replica(r):
                    self.mark[g] = BUSY

    def run(self) -> Plan:
        grants = self.grant()
        for pid, gen in self.gens.items():
            if gen.releasing:
                for r in sorted(gen.active):
                    self.shrink(pid, r)
        self.split_generation()
        return Plan(
            grants=grants,
            shrinks={p: sorted(r) for p, r in self.shrinks.items()},
            expands={p: sorted(r) for p, r in self.expands.items()},
        )

    # ---- 1. training-side requests ------------------------------------------------------------

    def grant(self) -> list[GpuRequest]:
        mark, reserved = self.mark, self.reserved
        grants: list[GpuRequest] = []
        for q in sorted(self.state.pending.values(), key=lambda q: (q.priority, q.seq)):
            gpus = q.gpus
            if any(mark[g] in (HELD, BLOCKED) or reserved[g] for g in gpus):
                pass  # waits for a training-side allocation (or a higher-priority request)
            elif all(mark[g] == FREE for g in gpus):
                grants.append(q)
                for g in gpus:
                    mark[g] = HELD
            else:
                for g in gpus:
                    who = self.owner[g]
                    if mark[g] == SETTLED and who is not None:
                        self.shrink(*who)
                for g in gpus:
                    mark[g] = BLOCKED
                    self.handoff.discard(g)
            for g in gpus:
                reserved[g] = 1
        return grants

    def shrink(self, pid: str, rank: int) -> None:
        self.shrinks.setdefault(pid, set()).add(rank)
        for g in self.gens[pid].spec.replica(rank):
            if self.mark[g] == SETTLED:
                self.mark[g] = HANDOFF
                self.owner[g] = None
                self.handoff.add(g)

    # ---- 3. generation split --------------------------------------------------------------------

    def split_generation(self) -> None:
        gens, mark = self.gens, self.mark
        self.cur = {pid: gen.current - len(self.shrinks.get(pid, ())) for pid, gen in gens.items()}
        eligible = [pid for pid, gen in gens.items() if gen.open and not gen.releasing]
        if not eligible:
            return
        self.eligible = set(eligible)
        self.topo = self.state.topology()
        self.peers: dict[int, list[str]] = {}
        for pid in gens:
            self.peers.setdefault(self.topo.group[pid], []).append(pid)
        taken = [g for g, m in enumerate(mark) if m == HELD or m == BLOCKED]
        lost: dict[int, int] = {}  # replicas that touch a training-side or preempted GPU
        for pid in eligible:
            shape, spec = self.topo.shape[pid], gens[pid].spec
            if shape not in lost:  # pipelines often declare one and the same generation cluster
                lost[shape] = len({spec.rank_of[g] for g in taken if g in spec.rank_of})
        self.need = {pid: gens[pid].needed for pid in eligible}
        # a pipeline never wants more replicas than it can place, nor than its remaining samples fill
        cap = {pid: min(gens[pid].spec.num_replicas - lost[self.topo.shape[pid]], self.need[pid]) for pid in eligible}
        self.want = self.shares(eligible, cap)
        pf = self.cfg.protect_fraction
        self.protected = {pid for pid in eligible if gens[pid].remaining <= pf * gens[pid].step_target}
        self.free = _NextFree(self.mark, lambda g: mark[g] == FREE)
        self.free_unreserved = _NextFree(self.mark, lambda g: mark[g] == FREE and not self.reserved[g])
        self.donor_heaps: dict[tuple[int, str], list[tuple[bool, float, str, int]]] = {}
        self.version = dict.fromkeys(gens, 0)
        self.sorted_active: dict[str, list[int]] = {}
        self.first_uncut: dict[str, int] = {}
        heap = [(self.key(pid), pid) for pid in eligible if cap[pid] > self.cur[pid]]
        heapq.heapify(heap)
        while heap:
            key, pid = heapq.heappop(heap)
            now = self.key(pid)
            if now != key:
                heapq.heappush(heap, (now, pid))
                continue
            if self.place_idle(pid) or self.place_from_donors(pid):
                self.cur[pid] += 1
                self.requeue(pid)
                if self.cur[pid] < cap[pid]:
                    heapq.heappush(heap, (self.key(pid), pid))

    def key(self, pid: str) -> tuple[int, float]:
        cur = self.cur[pid]
        return (0 if cur == 0 else 1, cur - self.want[pid])

    def shares(self, eligible: list[str], cap: dict[str, int]) -> dict[str, float]:
        """Wanted replicas per pipeline: remaining x tp share of its overlap group's usable GPUs."""
        gens, topo = self.gens, self.topo
        usable: dict[int, int] = {}
        for g, m in enumerate(self.mark):
            grp = topo.gpu_group[g]
            if grp >= 0 and m != HELD and m != BLOCKED:
                usable[grp] = usable.get(grp, 0) + 1
        groups: dict[int, list[str]] = {}
        for pid in eligible:
            groups.setdefault(topo.group[pid], []).append(pid)
        want: dict[str, float] = {}
        for grp, members in groups.items():
            total = float(usable.get(grp, 0))
            fair = self.cfg.guarantee * total / len(self.peers[grp])
            demand: dict[str, float] = {}
            lo: dict[str, float] = {}
            hi: dict[str, float] = {}
            for p in members:
                gen = gens[p]
                demand[p] = max(gen.remaining, 1) * gen.spec.tp
                hi[p] = float(cap[p] * gen.spec.tp)
                lo[p] = min(fair, demand[p], hi[p])
            if self.cfg.surplus == "proportional":
                split = _water_fill(total, demand, lo, hi)
            else:
                if self.cfg.surplus == "shortest_first":
                    order = sorted(members, key=lambda p: (demand[p], p))
                else:
                    order = sorted(members, key=lambda p: (-gens[p].completed, p))
                split, left = dict(lo), total - sum(lo.values())
                for p in order:
                    add = max(0.0, min(left, min(hi[p], demand[p]) - split[p]))
                    split[p] += add
                    left -= add
            for p, gpus in split.items():
                want[p] = gpus / gens[p].spec.tp
        return want

    def place_idle(self, pid: str) -> bool:
        """Claim a replica whose GPUs are all free: idle now and unreserved first (lowest GPU id),
        then idle now but reserved, then the lowest (reserved, rank) one that a shrink frees."""
        spec = self.gens[pid].spec
        cut = self.shrinks.get(pid, ())
        first = self.topo.first_gpu[pid]
        for free in (self.free_unreserved, self.free):
            r = self.first_replica(spec, cut, free, first)
            if r is not None:
                self.claim(pid, r, spec.replicas[r])
                return True
        best = None
        for g in self.handoff:  # few: shrinks of this plan whose GPUs no expansion claimed
            r = spec.rank_of.get(g)
            if r is None or r in cut:
                continue
            gpus = spec.replicas[r]
            if all(self.mark[h] == FREE or self.mark[h] == HANDOFF for h in gpus):
                key = (any(self.reserved[h] for h in gpus), r)
                if best is None or key < best:
                    best = key
        if best is None:
            return False
        self.claim(pid, best[1], spec.replicas[best[1]])
        return True

    def first_replica(self, spec: ClusterSpec, cut, free: _NextFree, g: int) -> int | None:
        """The replica of the lowest GPU >= g that `free` holds whose GPUs `free` all hold."""
        rank_of, n = spec.rank_of, self.state.num_gpus
        g = free.find(g)
        while g < n:
            r = rank_of.get(g)
            if r is not None and r not in cut and all(free.has(h) for h in spec.replicas[r]):
                return r
            g = free.find(g + 1)
        return None

    def place_from_donors(self, pid: str) -> bool:
        """Claim a replica by shrinking donors' replicas that sit on it, most surplus first."""
        min_one = self.cur[pid] == 0
        # within the hysteresis band, take only replicas their donor's remaining samples cannot
        # fill: the donor never wants them back, so the move cannot flap
        excess = not min_one and self.want[pid] - self.cur[pid] <= 0.5 + self.cfg.hysteresis
        mark, owner, gens = self.mark, self.owner, self.gens
        spec = gens[pid].spec
        cut = self.shrinks.get(pid, ())
        best = None
        tried: set[int] = set()
        order = self.donors(pid, min_one, excess)
        for d in order:
            dcut = self.shrinks.get(d, ())
            ranks, first = self.active_ranks(d)
            for i in range(first, len(ranks)):
                dr = ranks[i]
                if dr in dcut:
                    continue
                if (
                    best is not None
                    and best[0][0] == 1
                    and not best[0][3]
                    and best[0][1:3] == (d in self.protected, -self.surplus(d))
                ):
                    # a one-victim, unreserved pick from this donor: later replicas of the same
                    # donor could only offer a lower rank, not worth scanning them all for
                    break
                for r in sorted({spec.rank_of[g] for g in gens[d].spec.replicas[dr] if g in spec.rank_of}):
                    if r in tried or r in cut:
                        continue
                    tried.add(r)
                    gpus = spec.replicas[r]
                    victims: set[tuple[str, int]] = set()
                    for g in gpus:
                        m, who = mark[g], owner[g]
                        if m == SETTLED and who is not None:
                            victims.add(who)
                        elif m != FREE and m != HANDOFF:
                            break
                    else:
                        per_donor: dict[str, int] = {}
                        for v, _ in victims:
                            per_donor[v] = per_donor.get(v, 0) + 1
                        if pid in per_donor or not all(
                            self.donor_ok(v, k, min_one, excess) for v, k in per_donor.items()
                        ):
                            continue
                        score = (
                            len(victims),
                            any(v in self.protected for v in per_donor),
                            -min(self.surplus(v) for v in per_donor),
                            any(self.reserved[g] for g in gpus),
                            r,
                        )
                        if best is None or score < best[0]:
                            best = (score, r, gpus, victims)
            # donors come best first: a one-victim, unreserved pick cannot be beaten by later ones
            if best is not None and best[0][0] == 1 and not best[0][3]:
                break
        order.close()  # puts the donors it popped back
        if best is None:
            return False
        _, r, gpus, victims = best
        for d, dr in sorted(victims):
            self.shrink(d, dr)
            self.cur[d] -= 1
            self.requeue(d)
        self.claim(pid, r, gpus)
        return True

    def active_ranks(self, d: str) -> tuple[list[int], int]:
        """d's active ranks, lowest first, and where its first one this plan does not shrink sits.
        Donors give their lowest replica first, so the shrunk prefix is skipped once, not on every
        call (a donor holding half the pool would make the plan quadratic)."""
        ranks = self.sorted_active.get(d)
        if ranks is None:
            ranks = self.sorted_active[d] = sorted(self.gens[d].active)
        cut, i = self.shrinks.get(d, ()), self.first_uncut.get(d, 0)
        while i < len(ranks) and ranks[i] in cut:
            i += 1
        self.first_uncut[d] = i
        return ranks, i

    def donors(self, pid: str, min_one: bool, excess: bool) -> Generator[str, None, None]:
        """The pipelines donor_ok(d, 1, min_one, excess) accepts, by (protected, most surplus, id),
        read off lazily updated heaps so a plan that moves little does not sort every peer."""
        if excess:  # only replicas past the donor's need move
            passes = [("over", False)]
        elif min_one:
            passes = [("any", False)]
        else:  # unprotected donors while their surplus clears the band, then protected ones past need
            passes = [("any", True), ("over", True)]
        band = 0.5 + self.cfg.hysteresis
        for i, (kind, staged) in enumerate(passes):
            heap, popped = self.donor_heap(pid, kind), []
            try:
                while heap:
                    entry = heapq.heappop(heap)
                    protected, neg_surplus, d, version = entry
                    if version != self.version[d]:
                        continue  # stale: d's surplus changed since; its current entry is in the heap
                    popped.append(entry)
                    if d == pid:
                        continue
                    if staged and i == 0 and (protected or -neg_surplus <= band):
                        break  # every later unprotected donor has less surplus
                    if staged and i == 1 and not protected:
                        continue
                    yield d
            finally:
                for entry in popped:
                    heapq.heappush(heap, entry)

    def donor_heap(self, pid: str, kind: str) -> list[tuple[bool, float, str, int]]:
        grp = self.topo.group[pid]
        heap = self.donor_heaps.get((grp, kind))
        if heap is None:
            heap = [self.donor_entry(d) for d in self.peers[grp] if self.can_donate(d, kind)]
            heapq.heapify(heap)
            self.donor_heaps[(grp, kind)] = heap
        return heap

    def donor_entry(self, d: str) -> tuple[bool, float, str, int]:
        return (d in self.protected, -self.surplus(d), d, self.version[d])

    def can_donate(self, d: str, kind: str) -> bool:
        """ "any": donor_ok's floor whatever the receiver (an open pipeline keeps one replica);
        "over": and the replica is one its remaining samples cannot fill."""
        if d not in self.eligible:
            return self.cur[d] > 0
        return self.cur[d] > 1 and (kind == "any" or self.cur[d] - 1 >= self.need[d])

    def requeue(self, pid: str) -> None:
        """pid's replica count changed: its old donor entry goes stale, a new one is pushed."""
        self.version[pid] += 1
        for kind in ("any", "over"):
            heap = self.donor_heaps.get((self.topo.group[pid], kind))
            if heap is not None and self.can_donate(pid, kind):
                heapq.heappush(heap, self.donor_entry(pid))

    def surplus(self, pid: str) -> float:
        if pid not in self.eligible:
            return float("inf")  # no open demand: the first donor to take from
        return self.cur[pid] - self.want[pid]

    def donor_ok(self, pid: str, k: int, min_one: bool, excess: bool = False) -> bool:
        if pid not in self.eligible:
            return True
        if self.cur[pid] - k < 1:
            return False
        if excess:
            return self.cur[pid] - k >= self.need[pid]
        if min_one:
            return True
        if pid in self.protected:  # close to finishing: give up only replicas its samples cannot fill
            return self.cur[pid] - k >= self.need[pid]
        return self.surplus(pid) - (k - 1) > 0.5 + self.cfg.hysteresis

    def claim(self, pid: str, rank: int, gpus: tuple[int, ...]) -> None:
        self.expands.setdefault(pid, set()).add(rank)
        for g in gpus:
            self.mark[g] = BUSY
            self.handoff.discard(g)
            self.free.remove(g)
            self.free_unreserved.remove(g)


def _water_fill(total: float, demand: dict[str, float], lo: dict[str, float], hi: dict[str, float]) -> dict[str, float]:
    """Split `total` as clamp(level * demand, lo, hi) with the level that uses it all (or all hi)."""

    def used(level: float) -> float:
        return sum(min(max(level * d, lo[p]), hi[p]) for p, d in demand.items())

    if used(float("inf")) <= total:
        return dict(hi)
    a, b = 0.0, 1.0
    while used(b) < total:
        b *= 2.0
    for _ in range(50):
        mid = (a + b) / 2
        if used(mid) < total:
            a = mid
        else:
            b = mid
    return {p: min(max(b * d, lo[p]), hi[p]) for p, d in demand.items()}


class _NextFree:
    """The lowest GPU >= g that still satisfies a predicate that, once false, stays false during
    the plan (idle GPUs only get claimed): a skip list with path halving, near O(1) per query."""

    __slots__ = ("up",)

    def __init__(self, mark: bytearray, pred) -> None:
        n = len(mark)
        self.up = [g if pred(g) else g + 1 for g in range(n)] + [n]

    def find(self, g: int) -> int:
        up = self.up
        while up[g] != g:
            up[g] = up[up[g]]
            g = up[g]
        return g

    def has(self, g: int) -> bool:
        return self.up[g] == g

    def remove(self, g: int) -> None:
        self.up[g] = g + 1
