"""A minimal GRPO run on Tidal: rollouts from Tidal, the policy trained in PyTorch, the new weights
pushed back into Tidal after every step, and the train-inference mismatch measured.

    python examples/grpo.py                          # tiny random-init model, CPU, a few minutes
    python examples/grpo.py --async-steps 1          # rollouts of step k+1 overlap training step k
    python examples/grpo.py --model DIR --device cuda --dtype bfloat16   # any Llama/Qwen2/Qwen3

The trainer holds the policy as a Hugging Face transformers model (AutoModelForCausalLM, fp32).
The example starts `tidal serve` on 127.0.0.1 over the same checkpoint directory (or uses --url),
so both sides begin from the same weights. One step:

  1. prompts -> Tidal's token API (POST /generate: input_ids, n samples per prompt, temperature 1,
     logprobs of the sampled tokens, weight spans);
  2. rewards, then group-normalised advantages A = (r - mean(group)) / (std(group) + eps);
  3. a clipped policy-gradient (PPO-style) update, the behaviour policy being Tidal's rollout
     logprobs: ratio = exp(logp_trainer - logp_tidal), loss = -min(ratio A, clip(ratio) A), token mean;
  4. push the new weights into Tidal with version = step (tidal.sync's WeightSender, or a
     safetensors directory + POST /v1/update_weights), then check /v1/state serves that version.

The task ("digits"): the prompt is "Digits: " followed by random lowercase letters; the reward is
the fraction of the `max_tokens` completion slots filled with digit tokens (token ids whose text is
all ASCII digits; stopping early scores the missing slots as 0). It is verifiable by a one-line
check and learnable by a tiny random-init model: the signal is dense (every group holds some
digits at random), and the solution is a shift of the output distribution towards ten tokens that
any position can make. A uniformly random policy scores 10/272 = 0.037 with the byte-level tiny
tokenizer (|digit tokens| / vocab in general); the random-init model's own score is the first
step's reward.

Mismatch: before the first update of a step, the trainer's logprobs of the sampled tokens (its
weights are exactly the version it pushed last) are compared with Tidal's, on the samples whose
every token came from that same version: mean and max |delta|. In fp32 on CPU both compute the
same function, so the mean is ~3e-7. `mixed_mismatch_*` does the same for the same-version tokens
of samples that straddle a commit (async mode): it is ~1e-7 only if the engine recomputes the
running requests' KV under the new weights at commit, and shows the error when it keeps the old KV.

Asynchronous mode (--async-steps 1): a thread generates the rollouts of step k+1 while the main
thread trains step k, and the push of step k lands while those requests are running (Tidal commits
between two engine steps; generation is not paused). A token's version comes from its weight
spans; its staleness is (trainer version at the update) - (token version). Stale tokens are kept
and importance-weighted: the PPO ratio is taken against the logprobs of the version that actually
sampled them (Tidal reports those), and clipped. Staleness is bounded by --max-staleness twice:
the rollout of step t is only submitted once the engine serves version >= t-1-min(async_steps,
max_staleness), and a token older than the bound would be masked out of the loss (counted as
`masked`; with the gate this stays 0).

Per step it prints a table line under a progress bar, and writes JSON (--out) and a PNG (--plot):
mean reward, rollout tokens/s, push time, mismatch, stale and masked tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import httpx
import torch

from tidal.models.tiny import quiet_progress_bars


# -- the task --------------------------------------------------------------------------------
class DigitsTask:
    """Prompts "Digits: <letters>"; reward = digit tokens / max_tokens."""

    def __init__(self, tokenizer, vocab_size: int, prompt_letters: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_letters = prompt_letters
        self.seed = seed
        self.digit_ids = frozenset(i for i in range(min(vocab_size, len(tokenizer)))
                                   if _is_digits(tokenizer.decode([i])))
        if not self.digit_ids:
            raise ValueError("task 'digits': the tokenizer has no token whose text is all ASCII digits")
        self.random_policy_reward = len(self.digit_ids) / vocab_size

    def prompts(self, step: int, num: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        letters = torch.randint(0, 26, (num, self.prompt_letters), generator=gen).tolist()
        texts = ["Digits: " + "".join(string.ascii_lowercase[c] for c in row) for row in letters]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def reward(self, output_ids: list[int], max_tokens: int) -> float:
        return sum(t in self.digit_ids for t in output_ids[:max_tokens]) / max_tokens


def _is_digits(text: str) -> bool:
    return bool(text) and all(c in string.digits for c in text)


# -- rollouts from Tidal ---------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    group: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]                      # Tidal's, of each sampled token
    versions: list[int]                        # weight version of each token (from weight_spans)
    reward: float = 0.0
    advantage: float = 0.0


@dataclass(slots=True)
class Rollout:
    step: int
    samples: list[Sample]
    seconds: float
    submit_version: int                        # the version the engine served when it was submitted

    @property
    def num_tokens(self) -> int:
        return sum(len(s.output_ids) for s in self.samples)


def token_versions(spans: list[list[int]], num_tokens: int) -> list[int]:
    """Per-token weight version from [[version, start, end], ...] covering [0, num_tokens)."""
    out = [-1] * num_tokens
    for version, start, end in spans:
        out[start:end] = [version] * (end - start)
    if -1 in out:
        raise ValueError(f"weight_spans {spans} do not cover the {num_tokens} output tokens")
    return out


class TidalClient:
    """The few HTTP calls the trainer makes: /generate, /v1/state, /v1/update_weights."""

    def __init__(self, url: str, admin_key: str | None = None, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.timeout_s = timeout_s

    def state(self) -> dict:
        return self._check(httpx.get(self.url + "/v1/state", headers=self.headers, timeout=self.timeout_s),
                           "/v1/state")

    def update_weights(self, path: str, version: int) -> dict:
        return self._check(httpx.post(self.url + "/v1/update_weights", json={"path": path, "version": version},
                                      headers=self.headers, timeout=self.timeout_s), "/v1/update_weights")

    def rollout(self, step: int, prompts: list[list[int]], n: int, max_tokens: int, seed: int) -> Rollout:
        submit_version = self.state()["weight_version"]
        t0 = time.perf_counter()
        groups = asyncio.run(self._generate_all(prompts, n, max_tokens, seed))
        seconds = time.perf_counter() - t0
        samples = []
        for g, (prompt, outs) in enumerate(zip(prompts, groups)):
            for o in outs:
                ids, logprobs = o["output_ids"], o["output_logprobs"] or []
                if len(logprobs) != len(ids):
                    raise RuntimeError(f"/generate returned {len(logprobs)} output_logprobs for {len(ids)} "
                                       "output_ids: expected one per token")
                samples.append(Sample(g, prompt, ids, logprobs, token_versions(o["weight_spans"], len(ids))))
        return Rollout(step, samples, seconds, submit_version)

    async def _generate_all(self, prompts: list[list[int]], n: int, max_tokens: int, seed: int) -> list[list[dict]]:
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:
            return await asyncio.gather(*[self._generate(client, p, n, max_tokens, seed * 7919 + i)
                                          for i, p in enumerate(prompts)])

    async def _generate(self, client: httpx.AsyncClient, prompt: list[int], n: int, max_tokens: int,
                        seed: int) -> list[dict]:
        # temperature 1, no filters: Tidal's logprobs (log_softmax of the raw logits) are then
        # exactly the log-probabilities of the distribution the tokens were sampled from.
        body = {"input_ids": prompt, "sampling_params": {"n": n, "temperature": 1.0, "max_tokens": max_tokens,
                                                         "seed": seed, "logprobs": 0}}
        r = await client.post(self.url + "/generate", json=body)
        out = self._check(r, "/generate")
        return out if isinstance(out, list) else [out]

    @staticmethod
    def _check(r: httpx.Response, what: str) -> Any:
        if r.status_code != 200:
            raise RuntimeError(f"{what} answered {r.status_code}: {r.text[:500]}")
        return r.json()


# -- weight push -----------------------------------------------------------------------------
@dataclass(slots=True)
class PushReport:
    version: int                 # the version the push reported as committed
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    served: int = -1             # the version /v1/state reported right after the push


class DiskPush:
    """save_pretrained (safetensors) into a fresh directory, then POST /v1/update_weights."""

    def __init__(self, client: TidalClient, root: str | None) -> None:
        self.client = client
        self.root = tempfile.mkdtemp(prefix="tidal-grpo-push-", dir=root)
        self.last: str | None = None

    def push(self, model: torch.nn.Module, version: int) -> PushReport:
        t0 = time.perf_counter()
        path = os.path.join(self.root, f"v{version}")
        model.save_pretrained(path)
        t1 = time.perf_counter()
        reply = self.client.update_weights(path, version)
        t2 = time.perf_counter()
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)
        self.last = path
        return PushReport(reply["weight_version"], t2 - t0, {"save": t1 - t0, "update": t2 - t1})

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class SyncPush:
    """tidal.sync's WeightSender: tensors straight from the trainer's memory (gloo or shm)."""

    def __init__(self, url: str, admin_key: str | None, backend: str, timeout_s: float) -> None:
        from tidal.sync import WeightSender
        self.sender = WeightSender(urls=[url], backend=backend, admin_key=admin_key, timeout_s=timeout_s)

    def push(self, model: torch.nn.Module, version: int) -> PushReport:
        t0 = time.perf_counter()
        res = self.sender.push(model.state_dict(), version=version)
        if not res.ok:
            raise RuntimeError(f"push of version {version} failed: {res.replicas}")
        return PushReport(res.version, time.perf_counter() - t0, dict(res.phases))

    def close(self) -> None:
        self.sender.close()


def sync_available() -> bool:
    try:
        import tidal.sync  # noqa: F401
    except ImportError:
        return False
    return True


# -- training --------------------------------------------------------------------------------
def group_advantages(samples: list[Sample], eps: float = 1e-6) -> None:
    """A = (r - group mean) / (group std + eps); a group with equal rewards gets A = 0."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    for members in groups.values():
        r = torch.tensor([s.reward for s in members], dtype=torch.float64)
        std = r.std(unbiased=False) if len(members) > 1 else torch.tensor(0.0, dtype=torch.float64)
        for s, a in zip(members, ((r - r.mean()) / (std + eps)).tolist()):
            s.advantage = a


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor      # [B, L] prompt + output, right-padded
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor      # [B, T] index into the logits predicting output token j
    targets: torch.Tensor        # [B, T] output token ids (0 where padded)
    behaviour: torch.Tensor      # [B, T] Tidal's logprobs
    versions: torch.Tensor       # [B, T] token versions (-1 where padded)
    advantages: torch.Tensor     # [B]
    one_version: torch.Tensor    # [B] bool: every token of the sample came from one version

    @classmethod
    def pack(cls, samples: list[Sample], pad_id: int, device: torch.device) -> Batch:
        B = len(samples)
        L = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
        T = max(max(len(s.output_ids) for s in samples), 1)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        tgt = torch.zeros((B, T), dtype=torch.long)
        beh = torch.zeros((B, T), dtype=torch.float32)
        ver = torch.full((B, T), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            p, o = len(s.prompt_ids), len(s.output_ids)
            ids[i, :p + o] = torch.tensor(s.prompt_ids + s.output_ids)
            mask[i, :p + o] = 1
            pos[i, :o] = torch.arange(p - 1, p - 1 + o)
            tgt[i, :o] = torch.tensor(s.output_ids, dtype=torch.long)
            beh[i, :o] = torch.tensor(s.logprobs, dtype=torch.float32)
            ver[i, :o] = torch.tensor(s.versions, dtype=torch.long)
        adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        one = torch.tensor([len(set(s.versions)) <= 1 for s in samples])
        return cls(*(t.to(device) for t in (ids, mask, pos, tgt, beh, ver, adv, one)))

    def rows(self, idx: slice) -> Batch:
        return Batch(*(getattr(self, f.name)[idx] for f in fields(self)))


def token_logprobs(policy: torch.nn.Module, b: Batch) -> torch.Tensor:
    """[B, T] the policy's log-probability of each output token (fp32)."""
    logits = policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    picked = logits.gather(1, b.positions[..., None].expand(-1, -1, logits.shape[-1]))
    return picked.log_softmax(-1).gather(-1, b.targets[..., None]).squeeze(-1)


@dataclass(slots=True)
class TrainStats:
    loss: float
    clip_frac: float
    mismatch_mean: float | None      # same-version tokens of single-version samples
    mismatch_max: float | None
    mismatch_tokens: int
    mixed_mismatch_mean: float | None  # same-version tokens of samples that straddle a commit
    mixed_mismatch_max: float | None
    mixed_mismatch_tokens: int
    stale_tokens: int
    masked_tokens: int
    max_staleness_seen: int
    seconds: float


def train_step(policy: torch.nn.Module, opt: torch.optim.Optimizer, samples: list[Sample],
               trainer_version: int, args: argparse.Namespace, pad_id: int) -> TrainStats:
    """`args.ppo_epochs` clipped policy-gradient updates on one rollout; the policy's weights on
    entry are version `trainer_version`, so the first pass's logprobs measure the mismatch."""
    t0 = time.perf_counter()
    b = Batch.pack(samples, pad_id, next(policy.parameters()).device)
    valid = b.versions >= 0
    staleness = torch.where(valid, trainer_version - b.versions, 0)
    used = valid & (staleness <= args.max_staleness)
    passes = [_update(policy, opt, b, used, args) for _ in range(args.ppo_epochs)]
    loss, clipped, first_delta = sum(p[0] for p in passes), sum(p[1] for p in passes), passes[0][2]
    same = valid & (b.versions == trainer_version)
    one = b.one_version[:, None]
    return TrainStats(
        loss / args.ppo_epochs, clipped / (max(int(used.sum()), 1) * args.ppo_epochs),
        *_abs_stats(first_delta[same & one]), *_abs_stats(first_delta[same & ~one]),
        stale_tokens=int((valid & (staleness > 0)).sum()), masked_tokens=int((valid & ~used).sum()),
        max_staleness_seen=int(staleness[valid].max()) if bool(valid.any()) else 0,
        seconds=time.perf_counter() - t0)


def _update(policy: torch.nn.Module, opt: torch.optim.Optimizer, b: Batch, used: torch.Tensor,
            args: argparse.Namespace) -> tuple[float, int, torch.Tensor]:
    """One optimiser step over the whole rollout (micro-batched); the loss is the token mean of
    the clipped surrogate over `used` tokens. Returns (loss, clipped tokens, logp - behaviour)."""
    denom = max(int(used.sum()), 1)
    opt.zero_grad(set_to_none=True)
    loss_sum, clipped, deltas = 0.0, 0, []
    for lo in range(0, b.input_ids.shape[0], args.micro_batch):
        mb = slice(lo, lo + args.micro_batch)
        part, m_used = b.rows(mb), used[mb]
        log_ratio = token_logprobs(policy, part) - part.behaviour
        ratio = torch.exp(log_ratio)
        adv = part.advantages[:, None]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv)
        loss = -(surrogate * m_used).sum() / denom
        loss.backward()
        loss_sum += float(loss.detach())
        clipped += int((((ratio - 1).abs() > args.clip) & m_used).sum())
        deltas.append(log_ratio.detach())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    opt.step()
    return loss_sum, clipped, torch.cat(deltas)


def _abs_stats(delta: torch.Tensor) -> tuple[float | None, float | None, int]:
    """(mean |d|, max |d|, count), None where there is nothing to measure."""
    if not delta.numel():
        return None, None, 0
    return float(delta.abs().mean()), float(delta.abs().max()), int(delta.numel())


# -- asynchronous rollouts -------------------------------------------------------------------
class RolloutWorker(threading.Thread):
    """Generates the rollout of step t once the engine serves version >= base + t-1-lag, so that
    it runs at most `lag` steps ahead of the trainer and no token is more than `lag` versions old."""

    def __init__(self, make: Callable[[int], Rollout], steps: int, base: int, lag: int, timeout_s: float) -> None:
        super().__init__(name="grpo-rollouts", daemon=True)
        self.make, self.steps, self.base, self.lag, self.timeout_s = make, steps, base, lag, timeout_s
        self.results: queue.Queue = queue.Queue()
        self.pushed = base
        self.cond = threading.Condition()
        self.stopping = threading.Event()

    def notify_pushed(self, version: int) -> None:
        with self.cond:
            self.pushed = version
            self.cond.notify_all()

    def close(self) -> None:
        """Stop after the rollout in flight (each is bounded by the HTTP timeout) and wait for it."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        if self.is_alive():
            self.join(self.timeout_s)

    def run(self) -> None:
        try:
            for t in range(1, self.steps + 1):
                need = self.base + t - 1 - self.lag
                with self.cond:
                    if not self.cond.wait_for(lambda: self.pushed >= need or self.stopping.is_set(), self.timeout_s):
                        raise TimeoutError(f"rollout of step {t}: version {need} not pushed within {self.timeout_s}s")
                if self.stopping.is_set():
                    return
                self.results.put(self.make(t))
        except BaseException as e:     # handed to the trainer, which re-raises it
            self.results.put(e)

    def get(self) -> Rollout:
        item = self.results.get(timeout=self.timeout_s)
        if isinstance(item, BaseException):
            raise RuntimeError("the rollout thread failed") from item
        return item


# -- the server ------------------------------------------------------------------------------
class TidalServer:
    """`tidal serve MODEL_DIR` on 127.0.0.1 at a free port, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, model_dir: str, device: str, dtype: str, max_num_seqs: int, log_dir: str,
                 timeout_s: float = 300.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, "tidal-serve.log")
        cmd = [sys.executable, "-m", "tidal.cli", "serve", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", device, "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidal serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tidal serve was not healthy within {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the run ---------------------------------------------------------------------------------
COLUMNS = ("step", "reward", "tok/s", "push_s", "served", "mismatch", "max|d|", "stale", "masked", "loss")


def table_line(r: dict) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)
    return (f"{r['step']:>5} {r['reward_mean']:>7.3f} {r['rollout_tokens_per_s']:>8.0f} {r['push_s']:>7.3f} "
            f"{r['served_version']:>7} {num(r['mismatch_mean'], '.1e'):>9} {num(r['mismatch_max'], '.1e'):>8} "
            f"{r['stale_tokens']:>6} {r['masked_tokens']:>6} {r['loss']:>8.4f}")


def header() -> str:
    widths = (5, 7, 8, 7, 7, 9, 8, 6, 6, 8)
    return " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, widths))


class GRPORun:
    """One run: the policy and its optimiser, the task, the Tidal server and the weight pusher.
    Whatever it starts is closed by `stack` (the caller's ExitStack), even if setup fails."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        work = tempfile.mkdtemp(prefix="tidal-grpo-")
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        model_dir = args.model or _tiny_checkpoint(args.arch)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with quiet_progress_bars():
            self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.trainer_device)
        self.policy.train()
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.task = DigitsTask(self.tokenizer, self.policy.config.vocab_size, args.prompt_letters, args.seed)
        url = args.url
        if url is None:
            server = TidalServer(model_dir, args.device, args.dtype, args.prompts * args.n, work)
            stack.callback(server.stop)
            url = server.url
        self.client = TidalClient(url, args.admin_key)
        self.base = self.client.state()["weight_version"]
        self.pusher = (SyncPush(url, args.admin_key, args.sync_backend, args.push_timeout) if args.push == "sync"
                       else DiskPush(self.client, args.push_dir))
        stack.callback(self.pusher.close)
        if args.url is not None:
            # A server we did not start may serve other weights: make it serve ours first.
            self.base = self.push(self.base + 1).version
        self.worker: RolloutWorker | None = None
        if args.async_steps > 0:
            self.worker = RolloutWorker(self.rollout, args.steps, self.base,
                                        min(args.async_steps, args.max_staleness), args.push_timeout * 2)
            stack.callback(self.worker.close)

    def rollout(self, step: int) -> Rollout:
        a = self.args
        ro = self.client.rollout(step, self.task.prompts(step, a.prompts), a.n, a.max_tokens, a.seed + step)
        for s in ro.samples:
            s.reward = self.task.reward(s.output_ids, a.max_tokens)
        group_advantages(ro.samples)
        return ro

    def push(self, version: int) -> PushReport:
        """Push, then read back the version the engine serves (the trainer is the only pusher)."""
        with quiet_progress_bars():
            push = self.pusher.push(self.policy, version)
        push.served = self.client.state()["weight_version"]
        if push.version != version or push.served != version:
            raise RuntimeError(f"push of version {version}: the push reported {push.version}, "
                               f"the engine serves {push.served}")
        return push

    def step(self, step: int) -> dict:
        """Train on step `step`'s rollout (made under version base+step-1 or, async, one older),
        then push version base+step."""
        ro = self.worker.get() if self.worker is not None else self.rollout(step)
        stats = train_step(self.policy, self.opt, ro.samples, self.base + step - 1, self.args, self.pad_id)
        push = self.push(self.base + step)
        if self.worker is not None:
            self.worker.notify_pushed(push.version)
        return _record(step, ro, stats, push)

    def train(self) -> list[dict]:
        from tqdm import tqdm

        if self.worker is not None:
            self.worker.start()
        records = []
        print(header())
        with tqdm(range(1, self.args.steps + 1), desc="grpo", unit="step", file=sys.stderr,
                  disable=self.args.no_progress) as bar:
            for step in bar:
                records.append(self.step(step))
                bar.write(table_line(records[-1]))
                bar.set_postfix(reward=f"{records[-1]['reward_mean']:.3f}")
        return records


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        g = GRPORun(args, stack)
        result = _summary(args, g.task, g.base, g.train())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return result


def _tiny_checkpoint(arch: str) -> str:
    # The qwen3 one is the model `tidal serve` runs when given no MODEL_DIR.
    from tidal.models.tiny import tiny_checkpoint_cached
    return tiny_checkpoint_cached(arch)


def _record(step: int, ro: Rollout, stats: TrainStats, push: PushReport) -> dict:
    rewards = [s.reward for s in ro.samples]
    return {"step": step, "reward_mean": sum(rewards) / len(rewards), "rollout_tokens": ro.num_tokens,
            "rollout_s": ro.seconds, "rollout_tokens_per_s": ro.num_tokens / max(ro.seconds, 1e-9),
            "submit_version": ro.submit_version, "push_version": push.version, "served_version": push.served,
            "push_s": push.seconds, "push_phases": push.phases, **asdict(stats),
            "train_s": stats.seconds}


def _summary(args: argparse.Namespace, task: DigitsTask, base: int, records: list[dict]) -> dict:
    k = max(1, min(args.last, len(records)))
    tail = records[-k:]
    def tokens_mean(key: str) -> float | None:     # token-weighted over the steps that measured it
        n = sum(r[key + "_tokens"] for r in records)
        return sum(r[key + "_mean"] * r[key + "_tokens"] for r in records if r[key + "_tokens"]) / n if n else None

    config = {k2: v for k2, v in vars(args).items() if k2 != "admin_key"}   # never write the key
    return {
        "config": config, "task": "digits", "base_version": base,
        "random_policy_reward": task.random_policy_reward,
        "first_step_reward": records[0]["reward_mean"],
        "last_steps": k, "last_steps_reward": sum(r["reward_mean"] for r in tail) / k,
        "mismatch_mean": tokens_mean("mismatch"),
        "mismatch_max": max((r["mismatch_max"] for r in records if r["mismatch_tokens"]), default=None),
        "mixed_mismatch_mean": tokens_mean("mixed_mismatch"),
        "mixed_mismatch_max": max((r["mixed_mismatch_max"] for r in records if r["mixed_mismatch_tokens"]),
                                  default=None),
        "stale_tokens": sum(r["stale_tokens"] for r in records),
        "masked_tokens": sum(r["masked_tokens"] for r in records),
        "max_staleness_seen": max(r["max_staleness_seen"] for r in records),
        "steps": records,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in result["steps"]]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(steps, [r["reward_mean"] for r in result["steps"]], label="mean reward")
    ax[0, 0].axhline(result["random_policy_reward"], ls="--", c="gray", label="uniform random policy")
    ax[0, 0].set(title="reward (digit fraction)", xlabel="step", ylim=(0, 1.02))
    ax[0, 0].legend()
    ax[0, 1].plot(steps, [r["rollout_tokens_per_s"] for r in result["steps"]])
    ax[0, 1].set(title="rollout tokens/s (Tidal)", xlabel="step")
    ax[1, 0].plot(steps, [r["push_s"] for r in result["steps"]])
    ax[1, 0].set(title=f"weight push seconds ({result['config']['push']})", xlabel="step")
    for key, label in (("mismatch_mean", "mean |Δ logprob|"), ("mismatch_max", "max |Δ logprob|")):
        pts = [(r["step"], r[key]) for r in result["steps"] if r[key]]
        if pts:
            ax[1, 1].semilogy(*zip(*pts), label=label)
    ax[1, 1].set(title="train-inference mismatch (same version)", xlabel="step")
    ax[1, 1].legend()
    mode = f"async-steps {result['config']['async_steps']}" if result["config"]["async_steps"] else "synchronous"
    fig.suptitle(f"GRPO on Tidal: {result['config']['model'] or 'tiny ' + result['config']['arch']}, {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A minimal GRPO run on Tidal (see the module docstring).")
    p.add_argument("--model", default=None, help="HF checkpoint dir (Llama/Qwen2/Qwen3); default: a tiny random one")
    p.add_argument("--arch", default="qwen3", choices=["llama", "qwen2", "qwen3"],
                   help="without --model: the tiny random model's architecture (qwen3: Tidal's embedded default)")
    p.add_argument("--url", default=None, help="a running Tidal server serving --model (default: start one)")
    p.add_argument("--admin-key", default=os.environ.get("TIDAL_ADMIN_KEY"))
    p.add_argument("--device", default="cpu", help="the engine's device (default: cpu)")
    p.add_argument("--dtype", default="float32", help="the engine's dtype (default: float32)")
    p.add_argument("--trainer-device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts (groups) per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt-letters", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon")
    p.add_argument("--ppo-epochs", type=int, default=2, help="updates per rollout batch")
    p.add_argument("--micro-batch", type=int, default=256, help="samples per forward/backward")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--async-steps", type=int, default=0, help="rollouts generated this many steps ahead (0 or 1)")
    p.add_argument("--max-staleness", type=int, default=1, help="oldest token version trained on, in versions")
    p.add_argument("--push", default="sync" if sync_available() else "disk", choices=["sync", "disk"],
                   help="tidal.sync WeightSender, or safetensors dir + /v1/update_weights")
    p.add_argument("--sync-backend", default="shm", choices=["shm", "gloo"])
    p.add_argument("--push-dir", default=None, help="where disk pushes are written (under --weights-root)")
    p.add_argument("--push-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="trainer torch threads (0: torch's default)")
    p.add_argument("--last", type=int, default=10, help="steps averaged for the final reward")
    p.add_argument("--out", default=None, help="write the per-step JSON here")
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "prompts", "n", "max_tokens", "prompt_letters", "ppo_epochs", "micro_batch", "last"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} = {getattr(args, name)}, expected >= 1")
    if args.n < 2:
        raise SystemExit(f"--n = {args.n}, expected >= 2 (group-normalised advantages need a group)")
    if args.async_steps not in (0, 1):
        raise SystemExit(f"--async-steps = {args.async_steps}, expected 0 or 1")
    if args.max_staleness < 0:
        raise SystemExit(f"--max-staleness = {args.max_staleness}, expected >= 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit(f"--lr = {args.lr}, expected a positive number")
    if args.push == "sync" and not sync_available():
        raise SystemExit("--push sync: tidal.sync is not importable here; use --push disk")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    return run(args)


if __name__ == "__main__":
    main()
