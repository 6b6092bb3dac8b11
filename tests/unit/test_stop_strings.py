"""Stop strings on streamed text: the output is cut before the first stop string to complete, and no
delta ever carries the beginning of a stop string that later completes, however the text is split."""

import itertools
import random

import pytest

from llamaserve.tokenizer import StopStringMatcher


def stream(text: str, cuts: list[int], stop: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stop)
    pieces, last = [], 0
    for cut in cuts + [len(text)]:
        pieces.append(matcher.push(text[last:cut]))
        last = cut
        if matcher.stopped:
            break
    if not matcher.stopped:
        pieces.append(matcher.flush())
    return pieces, matcher.stopped


def expected(text: str, stop: list[str]) -> str:
    """The text cut at the start of the stop string that ends first (the longest of those ending there)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop if s and text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))]
    return text


def all_splits(text: str):
    """Every way to cut `text` into deltas, as cut positions."""
    for k in range(len(text)):
        yield from (list(cuts) for cuts in itertools.combinations(range(1, len(text)), k))


def test_match_across_deltas_is_never_half_released():
    pieces, stopped = stream("The answer is Paris. Then more", [14, 16, 18], ["Paris"])
    assert stopped and "".join(pieces) == "The answer is "
    assert not any("Pa" in p for p in pieces)


def test_partial_match_that_fails_is_released():
    pieces, stopped = stream("Par excellence", [2, 3], ["Paris"])
    assert not stopped and "".join(pieces) == "Par excellence"


def test_no_stop_strings_pass_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc" and matcher.flush() == ""


@pytest.mark.parametrize("seed", range(200))
def test_random_streams_equal_the_cut_text(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 8))))
    pieces, _ = stream(text, cuts, stop)
    assert "".join(pieces) == expected(text, stop)


@pytest.mark.parametrize("text, stop, result", [
    ("xabcd", ["abcd", "bc"], "xa"),  # "bc" completes first, though "abcd" starts earlier
    ("xabcd", ["abc", "bc"], "x"),  # both end at "c": cut at the longer one's start
    ("aaab", ["aab"], "a"),  # a failed partial match ("aa" then "a") restarts inside itself
    ("abababc", ["ababc"], "ab"),
    ("she sells", ["he", "she", "hers"], ""),
    ("ushers", ["hers", "she"], "u"),
    ("abxyz", ["xyzw", "bxy"], "a"),
])
def test_result_is_the_same_for_every_split(text, stop, result):
    assert expected(text, stop) == result
    for cuts in all_splits(text):
        pieces, stopped = stream(text, cuts, stop)
        assert "".join(pieces) == result and stopped, cuts


def test_held_back_text_is_exactly_a_possible_beginning():
    matcher = StopStringMatcher(["abcab", "cx"])
    assert matcher.push("zab") == "z"  # "ab" may begin "abcab"
    assert matcher.push("ca") == ""  # "abca" still may
    assert matcher.push("b!") == "" and matcher.stopped
    matcher = StopStringMatcher(["abcab", "cx"])
    assert matcher.push("abcaz") == "abcaz" and matcher.flush() == ""
    matcher = StopStringMatcher(["abcd"])
    assert matcher.push("ab") == "" and matcher.flush() == "ab" and matcher.push("cd") == "cd"


def test_long_repeated_character_with_a_long_stop_string_is_linear():
    # Scanning every stop string's every overlap on each push would take ~10^11 steps here.
    stop = "a" * 999 + "b"
    for pieces in (["a"] * 200_000, ["a" * 200_000]):
        matcher = StopStringMatcher([stop, "a" * 500 + "c"])
        released = "".join(matcher.push(p) for p in pieces)
        assert len(released) == 200_000 - 999 and not matcher.stopped
        assert matcher.push("b") == "" and matcher.stopped


@pytest.mark.parametrize("seed", range(200))
def test_random_stops_match_the_reference_for_random_splits(seed):
    rng = random.Random(1000 + seed)
    text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 30)))
    stop = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 5))]
    cuts = sorted(rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randrange(0, 10))))
    pieces, _ = stream(text, cuts, stop)
    assert "".join(pieces) == expected(text, stop)
