"""Stop strings on streamed text: the output is cut before the first match, and no delta ever
carries the beginning of a stop string that later completes."""

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
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else text


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
