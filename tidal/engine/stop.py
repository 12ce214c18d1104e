"""Stop checking: whether a sample's newest token ends it. The one place the engine decides this;
`Scheduler.resolve` calls `check_stop` for every sample that got a token in the step.

In order: a stop token id, then EOS (unless `ignore_eos`), then a stop string in the detokenized
output, each only once the sample has `min_tokens` outputs; then the length budget (`max_tokens`,
or the model's context). A sample with stop strings has a detokenizer (made at admission), which
every token advances here, below `min_tokens` too, so that its text is whole once a stop string
can match.
"""

from __future__ import annotations

from tidal.engine.detokenizer import find_stop
from tidal.engine.request import Request

Stop = tuple[str, int | str | None]  # (finish_reason, stop_reason): the token id or the stop string


def check_stop(req: Request) -> Stop | None:
    """Why the sample ends at its newest resolved token, or None while it goes on."""
    p = req.params
    n_out = req.num_resolved_output_tokens
    token = req.token_ids[req.num_prompt_tokens + n_out - 1]
    if n_out >= p.min_tokens:
        if token in p.stop_token_ids:
            return "stop", token
        if not p.ignore_eos and token in req.eos_token_ids:
            return "stop", token
        hit = _stop_string(req, token)
        if hit is not None:
            return "stop", hit
    elif req.detokenizer is not None:
        req.detokenizer.push([token])
    if req.ends_by_length(n_out):
        return "length", None
    return None


def _stop_string(req: Request, token: int) -> str | None:
    """The stop string that the text of `token` completes, if any (advances the detokenizer)."""
    detok = req.detokenizer
    if detok is None:
        return None
    before = len(detok.text)
    detok.push([token])
    hit = find_stop(detok.text, req.params.stop, before)
    return None if hit is None else hit[1]
