"""Output streaming: incremental detokenization, stop strings/tokens, eos and max_tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from replicas.detokenize import MAX_UNRESOLVED_TOKENS, OutputStream, StepOutput
from replicas.sampling_params import SamplingParams

CORPUS = ["héllo wörld 日本語 は 日本 🎉🎉 café naïve"] * 20 + ["the quick brown fox STOP"] * 10
UNICODE_TEXT = st.text(alphabet=st.sampled_from(list("ab xyzéö日本語は🎉\n.STOP")), max_size=40)


def _byte_level(vocab_size: int) -> Tokenizer:
    """Byte-level BPE: 256 byte tokens, ``<eos>`` (id 0), and merges up to ``vocab_size``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


# 257: no merges, every byte is its own token. 265: a few merges, some of which cut characters
# in two (e.g. " 日" is split after its second byte), so tokens both start and end mid-character.
TOKENIZERS = {"bytes": _byte_level(257), "bpe": _byte_level(265)}
EOS = 0


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request) -> Tokenizer:
    return TOKENIZERS[request.param]


def _stream(tok: Tokenizer, ids, eos=(EOS,), **params) -> tuple[OutputStream, list[StepOutput]]:
    stream = OutputStream(SamplingParams(**{"max_tokens": 10_000, **params}), eos, tok.decode)
    steps = []
    for token in ids:
        steps.append(stream.append(token))
        if steps[-1].finish_reason is not None:
            break
    return stream, steps


def _joined(steps) -> str:
    return "".join(s.text_delta for s in steps)


def test_tokenizers_split_characters():
    bpe = TOKENIZERS["bpe"]
    assert "ĠæĹ" in bpe.encode("café 日本").tokens
    assert len(TOKENIZERS["bytes"].encode("日").ids) == 3


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(text=UNICODE_TEXT)
def test_deltas_reassemble_the_text(name, text):
    tok = TOKENIZERS[name]
    ids = tok.encode(text).ids
    stream, steps = _stream(tok, ids)
    assert _joined(steps) == stream.text == tok.decode(ids) == text
    assert all("\ufffd" not in s.text_delta for s in steps)
    assert list(stream.token_ids) == ids and not stream.finished


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_arbitrary_token_sequences_match_full_decode(name, data):
    """Even invalid UTF-8 (random byte tokens) streams to exactly what decoding everything gives."""
    tok = TOKENIZERS[name]
    ids = data.draw(st.lists(st.integers(1, tok.get_vocab_size() - 1), max_size=MAX_UNRESOLVED_TOKENS))
    stream, steps = _stream(tok, ids, max_tokens=max(len(ids), 1))
    assert _joined(steps) == tok.decode(ids)


def test_split_character_is_held_back(tok):
    ids = tok.encode("wé日🎉").ids
    steps = _stream(tok, ids)[1]
    emitted = ""
    for step in steps:
        emitted += step.text_delta
        assert "\ufffd" not in emitted
        assert "wé日🎉".startswith(emitted)
    assert emitted == "wé日🎉"


def test_length_finish_flushes_an_incomplete_character():
    tok = TOKENIZERS["bytes"]
    ids = tok.encode("ok 日").ids[:-1]  # last byte of 日 missing
    stream, steps = _stream(tok, ids, max_tokens=len(ids))
    assert steps[-1].finish_reason == "length"
    assert _joined(steps) == stream.text == tok.decode(ids) == "ok \ufffd"


def test_context_dependent_decoder():
    """SentencePiece-style decoding drops a leading space only at the very start of the text."""
    vocab = {"[UNK]": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.decoder = decoders.Metaspace()
    stream, steps = _stream(tok, [1, 2, 3, 4, 2], eos=())
    assert [s.text_delta for s in steps] == ["Hello", " world", "!", " again", " world"]
    assert stream.text == tok.decode([1, 2, 3, 4, 2])


def test_decode_window_stays_small():
    tok = TOKENIZERS["bpe"]
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode("héllo wörld 日本語 🎉 " * 40).ids
    stream = OutputStream(SamplingParams(max_tokens=len(ids)), [EOS], decode)
    for token in ids:
        stream.append(token)
    assert stream.text == tok.decode(ids) and stream.finish_reason == "length"
    assert max(lengths) <= 8


def test_invalid_bytes_do_not_grow_the_window():
    tok = TOKENIZERS["bytes"]
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tok.decode(ids)

    continuation = tok.encode("é").ids[1]  # a lone continuation byte: always invalid
    stream = OutputStream(SamplingParams(max_tokens=200), [EOS], decode)
    for _ in range(200):
        stream.append(continuation)
    assert stream.text == "\ufffd" * 200
    assert max(lengths) <= 2 * MAX_UNRESOLVED_TOKENS + 2


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello world. STOP here", ["STOP"], "Hello world. "),
        ("abcabcabcd tail", ["abcd"], "abcabc"),
        ("前日本語の", ["日本"], "前"),
        ("x🎉🎉y", ["🎉y", "zz"], "x🎉"),
        ("one\n\ntwo", ["\n\n", "one"], ""),
        ("aaa STOP bbb ST", ["ST", "STOP"], "aaa "),
        ("STOP", ["STOP"], ""),
    ],
)
def test_stop_string_truncates_exactly(tok, text, stops, expected):
    ids = tok.encode(text).ids
    stream, steps = _stream(tok, ids, stop=stops)
    assert steps[-1].finish_reason == "stop"
    assert _joined(steps) == stream.text == expected
    assert stream.finished and len(stream.token_ids) == len(steps)


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello world. STOP here", ["STOP"], "Hello world. STOP"),
        ("前日本語の", ["日本"], "前日本"),
        ("aaa STOP bbb ST", ["STOP", "ST"], "aaa ST"),  # both start there: "ST" completed first
        ("one\n\ntwo", ["\n\n", "one"], "one"),
    ],
)
def test_include_stop_str_in_output_keeps_the_stop_string(tok, text, stops, expected):
    stream, steps = _stream(tok, tok.encode(text).ids, stop=stops, include_stop_str_in_output=True)
    assert steps[-1].finish_reason == "stop"
    assert _joined(steps) == stream.text == expected


def test_skip_special_tokens_false_decodes_them_into_the_text(tok):
    ids = [*tok.encode("hi").ids, EOS, *tok.encode(" there").ids]
    skipped, _ = _stream(tok, ids, eos=(), max_tokens=len(ids))
    kept, _ = _stream(tok, ids, eos=(), max_tokens=len(ids), skip_special_tokens=False)
    assert (skipped.text, kept.text) == ("hi there", "hi<eos> there")


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(text=UNICODE_TEXT, stop=st.text(alphabet=st.sampled_from(list("ab é日本🎉STOP")), min_size=1, max_size=4))
def test_stop_strings_never_leak(name, text, stop):
    tok = TOKENIZERS[name]
    ids = tok.encode(text).ids
    stream, steps = _stream(tok, ids, stop=[stop])
    emitted = ""
    for step in steps:
        emitted += step.text_delta
        assert stop not in emitted
    cut = text.find(stop)
    if cut >= 0:
        assert steps[-1].finish_reason == "stop" and emitted == text[:cut]
    else:
        assert emitted == stream.text
        # what is still held back is a proper prefix of the stop string
        assert text.startswith(emitted) and stop.startswith(text[len(emitted):])
        assert len(text) - len(emitted) < len(stop)


def test_stop_string_held_until_disambiguated(tok):
    ids = tok.encode("aSTOb STOP").ids
    stream, steps = _stream(tok, ids[:-1], stop=["STOP"])
    assert "S" in stream.text and not stream.text.endswith("S") and not stream.finished
    assert stream.append(ids[-1]).finish_reason == "stop"
    assert stream.text == "aSTOb "


def test_eos_and_stop_tokens_finish_without_text(tok):
    ids = tok.encode("hi 日本").ids
    stream, steps = _stream(tok, [*ids, EOS, *ids])
    assert steps[-1].finish_reason == "stop" and stream.text == "hi 日本"
    assert list(stream.token_ids) == [*ids, EOS]
    stop_id = tok.encode("!").ids[0]
    stream, steps = _stream(tok, [*ids, stop_id, *ids], stop_token_ids=[stop_id])
    assert steps[-1] == StepOutput(stop_id, "", "stop") and stream.text == "hi 日本"


def test_stop_token_flushes_an_incomplete_character():
    tok = TOKENIZERS["bytes"]
    ids = tok.encode("hi 日").ids[:-1]
    stream, steps = _stream(tok, [*ids, EOS], stop=["zzz"])
    assert steps[-1].finish_reason == "stop" and stream.text == "hi \ufffd"


def test_held_back_stop_prefix_is_released_at_the_end(tok):
    ids = tok.encode("abc ST").ids
    stream, steps = _stream(tok, [*ids, EOS], stop=["STOP"])
    assert steps[-1].finish_reason == "stop" and stream.text == "abc ST"
    stream, steps = _stream(tok, ids, stop=["STOP"], max_tokens=len(ids))
    assert steps[-1].finish_reason == "length" and stream.text == "abc ST"


def test_ignore_eos_and_max_tokens(tok):
    ids = tok.encode("ab").ids
    stream, steps = _stream(tok, [*ids, EOS, *ids, EOS], ignore_eos=True, max_tokens=len(ids) * 2 + 1)
    assert [s.finish_reason for s in steps] == [None] * (len(steps) - 1) + ["length"]
    assert len(stream.token_ids) == len(ids) * 2 + 1 and stream.text == "abab"
    stream, steps = _stream(tok, tok.encode("hello there").ids, max_tokens=3)
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    with pytest.raises(RuntimeError):
        stream.append(5)


def test_eos_on_the_last_allowed_token_is_stop(tok):
    ids = tok.encode("ab").ids
    stream, steps = _stream(tok, [*ids, EOS], max_tokens=len(ids) + 1)
    assert steps[-1].finish_reason == "stop"


def test_stop_string_in_the_last_token_is_stop():
    tok = TOKENIZERS["bytes"]
    ids = tok.encode("xyz").ids
    stream, steps = _stream(tok, ids, stop=["z"], max_tokens=len(ids))
    assert steps[-1].finish_reason == "stop" and stream.text == "xy"
