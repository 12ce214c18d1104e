"""Stop checking lives in one engine module (tidal/engine/stop.py) that Scheduler.resolve calls."""
from __future__ import annotations

import inspect

from tidal import SamplingParams
from tidal.engine import core as core_module
from tidal.engine.detokenizer import IncrementalDetokenizer
from tidal.engine.request import Request
from tidal.engine.scheduler import Scheduler
from tidal.engine.stop import check_stop

EOS = 2


def _req(outputs: list[int], detokenizer=None, max_model_len: int = 1 << 30, **params) -> Request:
    req = Request("r", 0, [5, 6, 7], SamplingParams(**params), seed=0, eos_token_ids=(EOS,),
                  max_model_len=max_model_len)
    req.detokenizer = detokenizer
    for t in outputs:
        req.append_token(t, None, None, 0)
    return req


class _CharTokenizer:
    """Token t decodes to chr(t): enough for the detokenizer's incremental decode."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids)


def test_stop_token_and_eos_end_a_sample_with_the_token_as_stop_reason():
    assert check_stop(_req([9, 11], stop_token_ids=[11])) == ("stop", 11)
    assert check_stop(_req([9, EOS])) == ("stop", EOS)
    assert check_stop(_req([9, EOS], ignore_eos=True)) is None
    assert check_stop(_req([9, 10])) is None


def test_min_tokens_holds_stops_back_but_not_the_length_budget():
    assert check_stop(_req([EOS], min_tokens=2)) is None
    assert check_stop(_req([9, EOS], min_tokens=2)) == ("stop", EOS)
    assert check_stop(_req([9, 10], max_tokens=2)) == ("length", None)
    # the model's context ends a sample that min_tokens would still hold back from stopping
    assert check_stop(_req([9, EOS], min_tokens=4, max_model_len=5)) == ("length", None)


def test_stop_strings_match_the_detokenized_text_below_min_tokens_too():
    tok = _CharTokenizer()
    text = [ord(c) for c in "xyab"]
    detok = IncrementalDetokenizer(tok, [5, 6, 7], False)
    req = Request("r", 0, [5, 6, 7], SamplingParams(stop=["ab"], min_tokens=4), seed=0)
    req.detokenizer = detok
    results = []
    for t in text:
        req.append_token(t, None, None, 0)
        results.append(check_stop(req))
    # Below min_tokens the text still grows, so a stop string that completes at min_tokens is seen.
    assert results == [None, None, None, ("stop", "ab")]
    assert detok.text == "xyab"


def test_scheduler_resolve_takes_no_stop_callback_and_core_has_no_stop_check():
    assert "check_stop" not in inspect.signature(Scheduler.resolve).parameters
    assert not hasattr(core_module.EngineCore, "_check_stop")
