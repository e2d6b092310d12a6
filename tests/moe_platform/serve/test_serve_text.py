"""TextStream: streamed text is final text - no partial UTF-8, no stop-string prefix."""
from moe_platform.serve.text import TextStream

# A toy "tokenizer": token id -> bytes; decoding replaces incomplete UTF-8 like byte-level BPE does.
EOS = 0
VOCAB = {1: b"ab", 2: b"c", 3: b"\n", 4: "é".encode()[:1], 5: "é".encode()[1:], 6: b"END", 7: b"x", 8: b"\xff"}


def decode(ids):
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens, **kwargs):
    stream = TextStream(decode=decode, eos_token_id=EOS, **{"max_tokens": 100, **kwargs})
    deltas = []
    for token in tokens:
        deltas.append(stream.push(token))
        if stream.finish_reason:
            break
    return deltas, stream


def test_text_is_released_token_by_token_and_eos_finishes_with_stop():
    deltas, stream = run([1, 2, EOS, 7])
    assert [d.text for d in deltas] == ["ab", "c", ""]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == 3  # eos counts as generated
    assert stream.finish_reason == "stop"


def test_a_partial_utf8_character_waits_for_its_last_byte():
    deltas, _ = run([1, 4, 5, EOS])
    assert [d.text for d in deltas] == ["ab", "", "é", ""]


def test_invalid_bytes_are_released_at_once_and_only_a_last_partial_character_waits():
    # 0xff can never start a character: its U+FFFD is final. A random or broken model emits such
    # bytes for many steps; holding every trailing U+FFFD kept its stream silent until the end.
    deltas, _ = run([8, 8, 4, 5, 8, EOS])
    assert [d.text for d in deltas] == ["", "\ufffd", "\ufffd", "é", "", "\ufffd"]


def test_max_tokens_finishes_with_length():
    deltas, _ = run([1, 2, 1, 2], max_tokens=3)
    assert "".join(d.text for d in deltas) == "abcab"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 3


def test_stop_string_spanning_tokens_is_held_back_and_cut():
    # "c\nEND": the stop "\nEND" starts in one token and ends in the next; "\n" must not leak.
    deltas, _ = run([1, 2, 3, 6, 1], stop=("\nEND",))
    assert [d.text for d in deltas] == ["ab", "c", "", ""]
    assert deltas[-1].finish_reason == "stop"


def test_a_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    deltas, _ = run([3, 1, EOS], stop=("\nEND",))
    assert [d.text for d in deltas] == ["", "\nab", ""]


def test_earliest_of_several_stop_strings_wins():
    deltas, _ = run([1, 2, 7], stop=("x", "bc"))
    assert "".join(d.text for d in deltas) == "a"
