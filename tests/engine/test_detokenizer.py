"""Incremental detokenization and stop strings.

The tokenizer is built here: byte-level BPE whose vocabulary is the 256 single bytes (id = byte
value), a few multi-byte tokens that cut UTF-8 characters in odd places, and special tokens.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tidal.engine.detokenizer import IncrementalDetokenizer, find_stop

SPECIALS = ["<|endoftext|>", "<|im_start|>"]
# Multi-byte tokens: whole characters, a space plus half a character, a character's tail, ASCII.
EXTRA = [" \xe4".encode("latin-1"), b"\xb8\xad", "中".encode(), b"\xf0\x9f", b"\x98\x80",
         " the".encode(), "é".encode(), b"\xc3", b"ab\xe2\x82"]


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: printable latin-1 bytes stand for themselves, the others are
    shifted to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def make_tokenizer(extra: list[bytes] = ()) -> PreTrainedTokenizerFast:
    chars = _byte_to_char()
    vocab = {chars[b]: b for b in range(256)}
    for piece in extra:
        vocab["".join(chars[b] for b in piece)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0],
                                   clean_up_tokenization_spaces=False)


TOK = make_tokenizer()
TOK_EXTRA = make_tokenizer(EXTRA)
SPECIAL_IDS = TOK.convert_tokens_to_ids(SPECIALS)
SPECIAL_IDS_EXTRA = TOK_EXTRA.convert_tokens_to_ids(SPECIALS)


def run(tok, ids: list[int], cuts: list[int], skip: bool) -> tuple[IncrementalDetokenizer, str]:
    """Push `ids` in pieces split at `cuts`; check the invariants after every push."""
    final = tok.decode(ids, skip_special_tokens=skip)
    detok = IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=skip)
    bounds = sorted({0, len(ids), *[c % (len(ids) + 1) for c in cuts]})
    streamed = ""
    for a, b in zip(bounds, bounds[1:]):
        before = detok.text
        new = detok.push(ids[a:b])
        assert detok.text == before + new
        streamed += new
        assert final.startswith(detok.text), (detok.text, final)
    streamed += detok.flush()
    return detok, final


def test_tokenizer_helper_is_byte_level():
    assert TOK.decode([0xE4, 0xB8, 0xAD]) == "中"
    assert TOK.decode([0xE4, 0xB8]) == "\ufffd"
    assert TOK("a b").input_ids == [ord("a"), ord(" "), ord("b")]
    assert TOK.decode([ord("a"), SPECIAL_IDS[0]], skip_special_tokens=True) == "a"
    assert TOK.decode([ord("a"), SPECIAL_IDS[0]], skip_special_tokens=False) == "a<|endoftext|>"
    assert TOK_EXTRA.decode([TOK_EXTRA.convert_tokens_to_ids("Ġä")]) == " \ufffd"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60), specials=st.lists(st.tuples(st.integers(0, 60), st.sampled_from([0, 1])),
                                                        max_size=4),
       cuts=st.lists(st.integers(0, 100), max_size=12), skip=st.booleans())
def test_random_bytes_decode_like_the_tokenizer(data, specials, cuts, skip):
    ids = list(data)
    for pos, which in sorted(specials, reverse=True):
        ids.insert(min(pos, len(ids)), SPECIAL_IDS[which])
    detok, final = run(TOK, ids, cuts, skip)
    assert detok.text == final


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30), cuts=st.lists(st.integers(0, 200), max_size=20))
def test_valid_utf8_never_emits_a_replacement_character(text, cuts):
    ids = list(text.encode())
    detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=True)
    bounds = sorted({0, len(ids), *[c % (len(ids) + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:]):
        detok.push(ids[a:b])
        assert text.startswith(detok.text)
    assert detok.text == text  # complete without flush
    assert detok.flush() == ""


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 256 + len(EXTRA) + len(SPECIALS) - 1), max_size=40),
       cuts=st.lists(st.integers(0, 100), max_size=12), skip=st.booleans())
def test_random_token_ids_with_multibyte_tokens(ids, cuts, skip):
    detok, final = run(TOK_EXTRA, ids, cuts, skip)
    assert detok.text == final


def test_one_token_at_a_time_holds_back_split_characters():
    detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=True)
    pieces = [detok.push([b]) for b in "a中😀b".encode()]
    assert pieces == ["a", "", "", "中", "", "", "", "😀", "b"]
    assert detok.text == "a中😀b"


def test_text_before_an_incomplete_character_is_emitted():
    tok_id = TOK_EXTRA.convert_tokens_to_ids
    detok = IncrementalDetokenizer(TOK_EXTRA, [], skip_special_tokens=True)
    assert detok.push([ord("x"), tok_id("Ġä")]) == "x "  # " \xe4": the space is complete
    assert detok.push([tok_id("¸Ń")]) == "中"
    assert detok.text == "x 中"


def test_invalid_bytes_become_replacement_characters_once_final():
    detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=True)
    assert detok.push([0x80]) == ""  # held: it could be mistaken for an unfinished sequence
    assert detok.push([ord("a")]) == "\ufffda"
    assert detok.push([0xE4, 0xB8]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == TOK.decode([0x80, ord("a"), 0xE4, 0xB8])


def test_special_tokens_are_skipped_or_kept():
    ids = [ord("h"), SPECIAL_IDS[1], ord("i"), SPECIAL_IDS[0]]
    for skip, expected in [(True, "hi"), (False, "h<|im_start|>i<|endoftext|>")]:
        detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=skip)
        assert "".join(detok.push([i]) for i in ids) == expected


def test_a_special_token_inside_a_split_character_when_skipped():
    ids = [0xE4, SPECIAL_IDS[0], 0xB8, 0xAD]
    detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=True)
    assert "".join(detok.push([i]) for i in ids) == "中" == TOK.decode(ids, skip_special_tokens=True)


def test_long_output_does_not_redecode_everything():
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return TOK.decode(ids, **kw)

    detok = IncrementalDetokenizer(Counting(), [], skip_special_tokens=True)
    ids = list(("héllo wörld 中文 " * 200).encode())
    for i in ids:
        detok.push([i])
    assert detok.text == TOK.decode(ids)
    assert max(calls) <= 8  # a window: the last character's tokens plus the pending ones


def test_empty_push_and_empty_output():
    detok = IncrementalDetokenizer(TOK, [5, 6], skip_special_tokens=True)
    assert detok.push([]) == "" and detok.flush() == "" and detok.text == ""


# --- find_stop ----------------------------------------------------------------------------------

def test_find_stop_in_the_new_region():
    assert find_stop("hello world", ["wor"], 6) == (6, "wor")
    assert find_stop("hello world", ["xyz"], 0) is None
    assert find_stop("", ["a"], 0) is None


def test_find_stop_spanning_old_and_new_text():
    # "lo w" starts in the old text (before 5) and ends in the new one.
    assert find_stop("hello world", ["lo w"], 5) == (3, "lo w")


def test_find_stop_ignores_occurrences_wholly_in_old_text():
    assert find_stop("stop and more", ["stop"], 4) is None
    assert find_stop("stop and stop", ["stop"], 4) == (9, "stop")
    assert find_stop("abcabc", ["abc"], 3) == (3, "abc")
    assert find_stop("abcabc", ["abc"], 2) == (0, "abc")


def test_find_stop_returns_the_earliest_and_first_listed_on_ties():
    assert find_stop("one two three", ["three", "two"], 0) == (4, "two")
    assert find_stop("abcd", ["abc", "ab"], 0) == (0, "abc")
    assert find_stop("abcd", ["ab", "abc"], 0) == (0, "ab")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab c", max_size=30), stop=st.lists(st.text(alphabet="abc", min_size=1,
                                                                         max_size=3), min_size=1,
                                                                max_size=3),
       start=st.integers(0, 30))
def test_find_stop_matches_brute_force(text, stop, start):
    start = min(start, len(text))
    hits = [(i, k) for k, s in enumerate(stop) for i in range(len(text))
            if text.startswith(s, i) and i + len(s) > start]
    expected = None
    if hits:
        i, k = min(hits)
        expected = (i, stop[k])
    assert find_stop(text, stop, start) == expected


def test_stop_strings_found_incrementally_equal_a_search_of_the_final_text():
    """How the engine uses both: push token by token, search from the previous length."""
    ids = list("the cat sat on the mat. 中文 STOP here".encode())
    for stop in (["mat."], ["中文"], ["STOP", "sat"], ["n t"], ["absent"]):
        detok = IncrementalDetokenizer(TOK, [], skip_special_tokens=True)
        hit = None
        for i in ids:
            before = len(detok.text)
            detok.push([i])
            hit = find_stop(detok.text, stop, before)
            if hit:
                break
        assert hit == find_stop(TOK.decode(ids), stop, 0)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
