"""SamplingParams validation, the batched sampler, and stop-string text handling."""

from __future__ import annotations

import math

import pytest
import torch

from pd_runtime.engine.errors import InvalidSamplingParams
from pd_runtime.engine.sampling import SamplingParams, TextStream, make_generator, sample

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("kw", [
    {"max_tokens": 0}, {"max_tokens": 1.5}, {"max_tokens": True}, {"min_tokens": -1},
    {"min_tokens": 5, "max_tokens": 4}, {"temperature": -0.1}, {"temperature": math.nan},
    {"top_p": 0.0}, {"top_p": 1.1}, {"top_k": -2}, {"seed": "x"}, {"stop": [""]},
    {"stop": ["x" * 300]}, {"stop_token_ids": [-1]}, {"ignore_eos": 1},
])
def test_bad_params_are_named_errors(kw):
    with pytest.raises(InvalidSamplingParams) as e:
        SamplingParams(**kw)
    assert e.value.http_status == 400 and e.value.code == "invalid_sampling_params"


def test_stop_string_alone_becomes_a_list():
    assert SamplingParams(stop="##").stop == ["##"]  # type: ignore[arg-type]


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_and_banned_tokens_are_skipped():
    lg = logits_rows(3)
    p = [SamplingParams(temperature=0.0)] * 3
    assert sample(lg, p, [None] * 3, [[]] * 3) == lg.argmax(-1).tolist()
    top = int(lg[0].argmax())
    got = sample(lg, p, [None] * 3, [[top], [], []])
    assert got[0] == int(lg[0].topk(2).indices[1])


def test_seeded_row_does_not_depend_on_its_batch_mates():
    lg = logits_rows(4)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(lg[:1], [p], [g], [[]])[0] for g in [make_generator(7)]]
    g = make_generator(7)
    other = SamplingParams(temperature=0.8)
    mixed = sample(torch.cat([lg[3:4], lg[:1], lg[1:3]]), [other, p, other, other],
                   [None, g, None, None], [[]] * 4, torch.Generator().manual_seed(1))
    assert mixed[1] == alone[0]


def test_top_k_and_top_p_restrict_the_support():
    lg = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    g = make_generator(0)
    k2 = {sample(lg, [SamplingParams(temperature=5.0, top_k=2)], [g], [[]])[0] for _ in range(300)}
    assert k2 == {0, 1}
    # probabilities at temperature 1: ~[.66, .24, .09, ...]: top_p .8 keeps the first two
    p8 = {sample(lg, [SamplingParams(top_p=0.8)], [g], [[]])[0] for _ in range(300)}
    assert p8 == {0, 1}
    tiny = {sample(lg, [SamplingParams(top_p=0.01)], [g], [[]])[0] for _ in range(50)}
    assert tiny == {0}


def test_sampling_follows_the_distribution():
    lg = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    g = make_generator(3)
    n = 4000
    counts = [0, 0, 0]
    for _ in range(n):
        counts[sample(lg, [SamplingParams(temperature=1.0)], [g], [[]])[0]] += 1
    for c, want in zip(counts, (0.7, 0.2, 0.1), strict=True):
        assert abs(c / n - want) < 0.03


def stream(text_tokens: list[str], stop: list[str]) -> tuple[list[str], bool]:
    ts = TextStream(lambda t: text_tokens[t], stop)
    out, hit = [], False
    for i in range(len(text_tokens)):
        d, hit = ts.push(i, check_stop=True)
        out.append(d)
        if hit:
            break
    if not hit:
        out.append(ts.flush())
    return out, hit


def test_stop_string_cuts_text_and_holds_possible_prefixes():
    out, hit = stream(["Hel", "lo wo", "rld", "!"], ["o w", "xyz"])
    assert hit and "".join(out) == "Hell"
    out, hit = stream(["ab", "c#", "#d", "ef"], ["##"])
    assert hit and "".join(out) == "abc"
    assert out[1] == "c"  # "#" held back: it may start "##"
    out, hit = stream(["ab", "c#", "d"], ["##"])
    assert not hit and "".join(out) == "abc#d" and out[2] == "#d"  # released once it cannot match


def test_no_detokenizer_means_no_text():
    ts = TextStream(None, ["x"])
    assert ts.push(3, True) == ("", False) and ts.flush() == ""


def test_detokenizer_tail_is_released_at_the_end():
    class Detok:
        def push(self, t: int) -> str:
            return "ab"[t]

        def flush(self) -> str:
            return "!"

    ts = TextStream(Detok(), [])
    assert ts.push(0, True) == ("a", False) and ts.push(1, True) == ("b", False)
    assert ts.flush() == "!" and ts.flush() == ""
