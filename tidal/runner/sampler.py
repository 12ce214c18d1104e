"""Batched token sampling on the logits' device: greedy, temperature, top-k, top-p, min-p, seeds.

Randomness is counter-based. The noise for (seed, step, token id) is an integer hash computed with
torch int64 ops, and a row's token is the winner of an exponential race (Gumbel-max):

    token = argmax_i  x_i - log(E_i),   x = logits / temperature (masked),  E_i ~ Exp(1)

so a row's token depends only on its own logits, parameters, seed and step: never on the other
rows, the batch size or the row order. No ``torch.Generator`` is involved, and CPU and GPU compute
the same noise bits (the float noise derived from them may differ in the last place, as the
devices' ``log`` does). On CUDA the race (hash, noise, filter floor, argmax) is one fused Triton
kernel; elsewhere it runs as torch ops. Both compute the same function (tested in Triton's
interpreter). The hash constants live in both: change them together.

Filtering keeps ties: top-k keeps every token whose scaled logit is >= the k-th largest one, and
min-p drops tokens whose probability is < min_p * max probability. top-p walks the tokens in order
of (probability descending, token id ascending) and keeps the shortest prefix whose cumulative
probability reaches top_p (the top token is always kept).

Logprobs come in two modes (docs/numerics.md), chosen per row: "raw" is log_softmax of the model's
logits; "processed" is the log-probability under the distribution the token was drawn from,
log_softmax of x with every filtered token at -inf (greedy rows: temperature 1, no filters, so
processed = raw apart from token bans, as vLLM's "processed_logprobs").

Penalties (vLLM's semantics, `apply_penalties`) change the logits before all of this, so greedy
and sampled tokens and processed logprobs see them; raw logprobs do not.

One file, past 400 lines, for one job (logits in, tokens and logprobs out): the torch and Triton
forms of the race must stay the same function, so they sit side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tidal.kernels.rowwise import row_logsumexp, row_softmax_cumsum
from tidal.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
# Multipliers of a bijective 32-bit mixer (the "lowbias32" xorshift-multiply family). Both are
# < 2**31 and the values they multiply are < 2**32, so every product is < 2**63: the int64 ops
# never overflow, and the hash is exact, with the same result on any device.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_TOKEN_SALT = 0x5BD1E995
_SEED_SALT = 0x27D4EB2F
_INF = float("inf")


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters of one step, on the logits' device.

    Greedy rows have temperature 0 and their filters switched off (top_p 1, top_k 0, min_p 0).
    """

    temperature: Tensor  # [B] float32 (0: greedy)
    top_p: Tensor  # [B] float32 (1.0: off)
    top_k: Tensor  # [B] int64   (0 or >= vocab: off)
    min_p: Tensor  # [B] float32 (0: off)
    seeds: Tensor  # [B] int64   per-row seed
    steps: Tensor  # [B] int64   index of the sampled token within the row's output
    all_greedy: bool
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    max_num_logprobs: int  # -1: none; 0: sampled token's logprob; k: also the top-k
    max_top_k: int = 0  # largest top_k of a sampled (non-greedy) row, 0 if none
    processed: Tensor | None = None  # [B] bool: row reports processed logprobs (None: no row does)
    all_processed: bool = False

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        device: torch.device | str,
        logprobs_mode: str = "raw",
    ) -> SamplingTensors:
        if not (len(params) == len(seeds) == len(steps)):
            raise ValueError(
                f"SamplingTensors.build: params, seeds and steps must have one entry "
                f"per row, got {len(params)}, {len(seeds)} and {len(steps)}"
            )
        rows = [cls.row(p, seed, logprobs_mode) for p, seed in zip(params, seeds)]
        return cls.from_rows(rows, [int(s) for s in steps], _DirectUpload(torch.device(device)))

    @staticmethod
    def row(p: SamplingParams, seed: int, logprobs_mode: str = "raw") -> tuple:
        """A request's constant sampling parameters, as `from_rows` takes them:
        (temperature, top_p, min_p, top_k, seed, logprobs or -1, processed). logprobs_mode is the
        engine's default, for a request whose own `logprobs_mode` is None."""
        lp = -1 if p.logprobs is None else p.logprobs
        processed = (p.logprobs_mode or logprobs_mode) == "processed"
        if p.greedy:
            return (0.0, 1.0, 0.0, 0, _as_int64(seed), lp, processed)
        return (float(p.temperature), float(p.top_p), float(p.min_p), max(p.top_k, 0), _as_int64(seed), lp, processed)

    @classmethod
    def from_rows(cls, rows: list[tuple], steps: list[int], staging) -> SamplingTensors:
        """Rows from `row`, one per target; `staging.upload(key, arrays, dtype)` puts the packed
        arrays on the device (the engine's pinned staging buffers, or `_DirectUpload`)."""
        n = len(rows)
        # Rows padded to 4 columns, so that every parameter row starts 16-byte aligned (Triton
        # compiles a kernel variant per pointer alignment).
        width = -(-n // 4) * 4
        floats = np.zeros((3, width), dtype=np.float32)
        floats[:, :n] = np.array([r[:3] for r in rows], dtype=np.float32).reshape(n, 3).T
        ints = np.zeros((3, width), dtype=np.int64)
        ints[0, :n] = [r[3] for r in rows]
        ints[1, :n] = [r[4] for r in rows]
        ints[2, :n] = steps
        (f_dev,) = staging.upload("sampling_f32", [floats], torch.float32)
        (i_dev,) = staging.upload("sampling_i64", [ints], torch.int64)
        temps, top_ps, min_ps, top_ks = floats[0, :n], floats[1, :n], floats[2, :n], ints[0, :n]
        flags = [bool(r[6]) for r in rows]
        processed = None
        if any(flags):
            (processed,) = staging.upload("sampling_bool", [np.array(flags, dtype=np.bool_)], torch.bool)
        return cls(
            temperature=f_dev[0, :n],
            top_p=f_dev[1, :n],
            min_p=f_dev[2, :n],
            top_k=i_dev[0, :n],
            seeds=i_dev[1, :n],
            steps=i_dev[2, :n],
            all_greedy=not temps.any(),
            any_top_p=bool((top_ps < 1.0).any()),
            any_top_k=bool((top_ks > 0).any()),
            any_min_p=bool((min_ps > 0.0).any()),
            max_num_logprobs=max((r[5] for r in rows), default=-1),
            max_top_k=int(top_ks.max(initial=0)),
            processed=processed,
            all_processed=all(flags) and n > 0,
        )


class _DirectUpload:
    """`from_rows`' uploader outside the engine: one plain copy per array."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def upload(self, key: str, arrays: list[np.ndarray], dtype: torch.dtype) -> list[Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype) for a in arrays]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] float32: the sampled token's logprob (raw or processed)
    top_token_ids: Tensor | None  # [B, k] int64, k = max_num_logprobs; a row asking for
    top_logprobs: Tensor | None  # [B, k] float32  fewer takes the first ones
    ranks: Tensor | None = None  # [B] int64: 1 + tokens with a strictly higher logprob


class Sampler:
    """Stateless apart from a per-(vocab size, device) cache of token hash codes.

    use_triton: run the race (hash, noise, argmax) as one fused Triton kernel; None: on CUDA
    when Triton imports. The torch path computes the same function, pass by pass.

    batch_invariant: the sums over the vocabulary (logsumexp of the logprobs, top-p's softmax and
    cumsum) run as one-program-per-row Triton kernels of fixed order (tidal.kernels.rowwise), since
    torch's CUDA reductions split a row by the batch size; the engine sets it on CUDA in
    batch-invariant mode (on the CPU torch's are row-invariant). Max, argmax, top-k, sort and
    gather are exact and stay torch's.
    """

    def __init__(self, use_triton: bool | None = None, batch_invariant: bool = False) -> None:
        self.use_triton = use_triton
        self.batch_invariant = batch_invariant
        self._token_codes: dict[tuple[int, torch.device], Tensor] = {}
        self._cpu_workspace: _Workspace | None = None

    def __call__(self, logits: Tensor, t: SamplingTensors, raw_logits: Tensor | None = None) -> SamplerOutput:
        """logits: [B, V], after token bans; raw_logits: the model's logits before the bans, for
        raw-mode logprobs (None: the same as logits)."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        want_processed = t.max_num_logprobs >= 0 and t.processed is not None
        processed = None
        if t.all_greedy:
            token_ids = greedy_ids
        else:
            sampled, processed = self._sample(logits, t, want_processed)
            token_ids = torch.where(t.temperature == 0, greedy_ids, sampled)
        if t.max_num_logprobs < 0:
            return SamplerOutput(token_ids, None, None, None)
        src = logits if raw_logits is None else raw_logits.float()
        if want_processed and t.processed is not None:
            # Greedy rows: temperature 1 and no filters, so their processed logits are the logits.
            proc = logits if processed is None else processed
            src = proc if t.all_processed else torch.where(t.processed[:, None], proc, src)
        return logprobs_of(src, token_ids, t.max_num_logprobs, self.batch_invariant)

    def _sample(self, logits: Tensor, t: SamplingTensors, want_processed: bool) -> tuple[Tensor, Tensor | None]:
        """Sampled token ids [B], and with want_processed the filtered scaled logits [B, V] that
        they were drawn from (-inf where a filter dropped the token)."""
        vocab = logits.shape[-1]
        x = logits / torch.where(t.temperature > 0, t.temperature, 1.0)[:, None]
        if t.any_top_k:
            top_k_on = ((t.top_k > 0) & (t.top_k < vocab))[:, None]
        log_min_p = t.min_p.log()[:, None] if t.any_min_p else None  # log(0) = -inf: off

        if t.any_top_p:
            # Work in sorted order; ties keep token-id order, so the kept prefix is well defined.
            xs, order = x.sort(dim=-1, descending=True, stable=True)
            if t.any_top_k:
                kth = xs.gather(1, (t.top_k.clamp(1, vocab) - 1)[:, None])
                xs.masked_fill_(top_k_on & (xs < kth), -_INF)
            cum = row_softmax_cumsum(xs) if self.batch_invariant else xs.softmax(dim=-1).cumsum_(dim=-1)
            drop = (cum[:, :-1] >= t.top_p[:, None]) & (t.top_p < 1.0)[:, None]
            xs[:, 1:].masked_fill_(drop, -_INF)
            floor = None if log_min_p is None else xs[:, :1] + log_min_p
            winner = self._race(xs, floor, t, order)
            processed = None
            if want_processed:
                kept = xs if floor is None else xs.masked_fill(xs < floor, -_INF)
                processed = torch.empty_like(kept).scatter_(1, order, kept)
            return order.gather(1, winner[:, None]).squeeze(1), processed

        # Unsorted: every filter is a per-row floor on x (the k-th largest value, the min-p bar).
        floor = None
        if t.any_top_k:
            kmax = min(t.max_top_k, vocab)
            top_vals = x.topk(kmax, dim=-1, sorted=True).values
            kth = top_vals.gather(1, (t.top_k.clamp(1, kmax) - 1)[:, None])
            floor = torch.where(top_k_on, kth, -_INF)
        if log_min_p is not None:
            bar = x.amax(dim=-1, keepdim=True) + log_min_p
            floor = bar if floor is None else torch.maximum(floor, bar)
        processed = None
        if want_processed:
            processed = x if floor is None else x.masked_fill(x < floor, -_INF)
        return self._race(x, floor, t, None), processed

    def _race(self, x: Tensor, floor: Tensor | None, t: SamplingTensors, ids: Tensor | None) -> Tensor:
        """Per row: argmax_j x_j - log(E_j) over the columns with x_j >= floor.

        x: [B, N]; floor: [B, 1] or None; ids: [B, N] token id of each column, or None when
        column j is token j. E comes from (t.seeds, t.steps, token id). Returns [B] int64
        column indices.
        """
        use_triton = self.use_triton
        if use_triton is None:
            use_triton = x.is_cuda and triton is not None
        if use_triton:
            return race_triton(x, floor, t.seeds, t.steps, ids)
        keys = row_keys(t.seeds, t.steps)
        if ids is None:
            codes = self._codes(x.shape[1], x.device)[None, :]
        else:
            codes = token_codes(ids)
        rows, n = x.shape
        return _race_torch(x, floor, keys, codes, self._workspace(rows, n, x.device))

    def _workspace(self, rows: int, n: int, device: torch.device) -> _Workspace:
        if device.type != "cpu":  # the caching allocator makes buffers cheap: don't hold them
            return _Workspace(rows, n, device)
        rows = max(1, min(rows, _CPU_CHUNK_ELEMENTS // max(n, 1)))
        ws = self._cpu_workspace
        if ws is None or ws.shape[1] != n or ws.shape[0] < rows:
            ws = self._cpu_workspace = _Workspace(rows, n, device)
        return ws

    def _codes(self, vocab: int, device: torch.device) -> Tensor:
        key = (vocab, device)
        codes = self._token_codes.get(key)
        if codes is None:
            codes = token_codes(torch.arange(vocab, dtype=torch.int64, device=device))
            self._token_codes[key] = codes
        return codes


# On CPU the race runs over chunks of rows in reused buffers: fresh multi-megabyte tensors cost
# page faults, and chunks that fit in cache run faster.
_CPU_CHUNK_ELEMENTS = 1 << 20


class _Workspace:
    """Buffers for the torch race over [rows, n]: two int64, three float32, one bool."""

    def __init__(self, rows: int, n: int, device: torch.device) -> None:
        self.shape = (rows, n)
        self.bits = torch.empty(rows, n, dtype=torch.int64, device=device)
        self.tmp = torch.empty_like(self.bits)
        self.u = torch.empty(rows, n, dtype=torch.float32, device=device)
        self.v = torch.empty_like(self.u)
        self.w = torch.empty_like(self.u)
        self.mask = torch.empty(rows, n, dtype=torch.bool, device=device)


def _race_torch(x: Tensor, floor: Tensor | None, keys: Tensor, codes: Tensor, ws: _Workspace) -> Tensor:
    rows, n = x.shape
    step = ws.shape[0]
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        m = b - a
        bits, tmp = ws.bits[:m], ws.tmp[:m]
        torch.bitwise_xor(keys[a:b, None], codes if codes.shape[0] == 1 else codes[a:b], out=bits)
        _mix32_(bits, tmp)
        score = _log_exponentials_(bits, ws.u[:m], ws.v[:m], ws.w[:m])
        torch.sub(x[a:b], score, out=score)
        if floor is not None:
            score.masked_fill_(torch.lt(x[a:b], floor[a:b], out=ws.mask[:m]), -_INF)
        out[a:b] = score.argmax(dim=-1)
    return out


def logprobs_of(src: Tensor, token_ids: Tensor, k: int, batch_invariant: bool = False) -> SamplerOutput:
    """log_softmax(src) at `token_ids` with their ranks, and the k best of each row (k > 0)."""
    logprobs, ranks, top_ids, top_logprobs = token_logprobs(src, token_ids, k, batch_invariant)
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs, ranks)


def token_logprobs(
    src: Tensor, token_ids: Tensor, k: int, batch_invariant: bool = False
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(logprobs, ranks, top ids, top logprobs) of logprobs_of; the top pair is None unless k > 0.
    batch_invariant: the logsumexp in a fixed order per row (Sampler.batch_invariant)."""
    lse = row_logsumexp(src)[:, None] if batch_invariant else torch.logsumexp(src, dim=-1, keepdim=True)
    chosen = src.gather(1, token_ids[:, None])
    logprobs = (chosen - lse).squeeze(1)
    ranks = (src > chosen).sum(dim=-1) + 1
    if k <= 0:
        return logprobs, ranks, None, None
    top_vals, top_ids = src.topk(min(k, src.shape[-1]), dim=-1)
    return logprobs, ranks, top_ids, top_vals - lse


@dataclass(slots=True)
class PenaltyTensors:
    """Per-row penalties of one step and the tokens they count, as (row, token id) pairs."""

    repetition: Tensor  # [B] float32 (1.0: off)
    presence: Tensor  # [B] float32 (0.0: off)
    frequency: Tensor  # [B] float32 (0.0: off)
    prompt_rows: Tensor  # [Np] int64: prompt tokens (repetition only)
    prompt_ids: Tensor  # [Np] int64
    output_rows: Tensor  # [No] int64: output tokens, once per occurrence
    output_ids: Tensor  # [No] int64


def apply_penalties(logits: Tensor, p: PenaltyTensors) -> Tensor:
    """vLLM's penalties, out of place. Repetition: a token seen in the prompt or the output has a
    positive logit divided by the penalty, a non-positive one multiplied by it. Then frequency
    (times the token's count in the output) and presence (once if it occurs) are subtracted."""
    counts = torch.zeros_like(logits)
    counts.index_put_((p.output_rows, p.output_ids), counts.new_ones(()), accumulate=True)
    occurs = counts > 0
    seen = occurs.clone()
    seen.index_put_((p.prompt_rows, p.prompt_ids), seen.new_ones(()))
    rep = p.repetition[:, None]
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return out - p.frequency[:, None] * counts - p.presence[:, None] * occurs


def apply_token_bans(logits: Tensor, rows: Tensor, token_ids: Tensor) -> None:
    """Set logits[rows[i], token_ids[i]] = -inf in place (e.g. EOS and stop ids before min_tokens)."""
    logits.index_put_((rows, token_ids), logits.new_full((), -_INF))


# --- counter-based randomness --------------------------------------------------------------------


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit hash, elementwise, of an int64 tensor holding values in [0, 2**32)."""
    return _mix32_(x.clone(), torch.empty_like(x))


def _mix32_(x: Tensor, tmp: Tensor) -> Tensor:
    """mix32 in place; tmp: a scratch tensor of x's shape."""
    x ^= torch.bitwise_right_shift(x, 16, out=tmp)
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= torch.bitwise_right_shift(x, 15, out=tmp)
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= torch.bitwise_right_shift(x, 15, out=tmp)
    return x


def row_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """[B] int64 keys in [0, 2**32) from (seed, step); seeds use all 64 bits, steps the low 32."""
    key = mix32((seeds & _MASK32) ^ _SEED_SALT)
    key = mix32(key ^ ((seeds >> 32) & _MASK32))
    return mix32(key ^ (steps & _MASK32))


def token_codes(token_ids: Tensor) -> Tensor:
    """Per-token hash codes; distinct ids get distinct codes (mix32 is a bijection)."""
    return mix32(token_ids ^ _TOKEN_SALT)


def random_bits(keys: Tensor, codes: Tensor) -> Tensor:
    """Uniform 32-bit integers (as int64) for each (row key, token code) pair, broadcasting."""
    bits = keys ^ codes
    return _mix32_(bits, torch.empty_like(bits))


def log_exponentials(keys: Tensor, codes: Tensor) -> Tensor:
    """log(E) with E ~ Exp(1), float32, one per (row key, token code) pair, broadcasting.

    u = (bits + 1/2) / 2**32 lies in (0, 1) and E = -log1p(-u), computed as u * log(z) / (z - 1)
    with z = 1 - u (exact enough in float32, and the same formula the Triton kernel uses, which
    has no log1p). Small u, the upper tail of -log(E) that decides rare winners, keeps float32's
    relative precision (down to u = 2**-33); u is clamped below 1, which only touches draws that
    cannot win.
    """
    return log_exponentials_from_bits(random_bits(keys, codes))


def log_exponentials_from_bits(bits: Tensor) -> Tensor:
    u = torch.empty(bits.shape, dtype=torch.float32, device=bits.device)
    return _log_exponentials_(bits, u, torch.empty_like(u), torch.empty_like(u))


def _log_exponentials_(bits: Tensor, u: Tensor, z: Tensor, zm1: Tensor) -> Tensor:
    """log(E) from bits into u (returned); z, zm1: float32 scratch of the same shape."""
    u.copy_(bits).mul_(2.0**-32).add_(2.0**-33).clamp_(max=1.0 - 2.0**-24)
    torch.sub(1.0, u, out=z)
    torch.sub(z, 1.0, out=zm1)
    # log(z) / (z - 1) is 0/0 exactly where z == 1, and there the ratio's limit is 1.
    z.log_().div_(zm1).nan_to_num_(nan=1.0)
    return u.mul_(z).log_()


def _as_int64(seed: int) -> int:
    """Any Python int, reduced modulo 2**64 into int64's range."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


try:
    from tidal.kernels.sampling import race_triton, triton
except ImportError:  # the CPU-only install without Triton: the torch path serves
    triton = None
