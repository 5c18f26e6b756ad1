"""The image-blind priors a trained model must beat (benchmarks/learning.py)."""
import pytest

from medrega.grammar import parse_regions
from medrega.metrics.baselines import PriorBaseline, greedy_mode


def t2r(name: str, box: list[int], lang: str = "en") -> dict:
    answer = f"<ref>{name}</ref><box>[[{', '.join(map(str, box))}]]</box>"
    return {"task": "t2r", "lang": lang, "conversations": [{"value": "q"}, {"value": answer}]}


def test_greedy_mode_writes_what_a_blind_greedy_decoder_writes_not_the_mean():
    boxes = ["620, 10, 700, 90", "639, 12, 710, 95", "621, 10, 700, 91", "150, 1, 200, 5"]
    # '6' leads 3 of 4; then '2' leads 2 of 3 ('620', '621'); then '0' and '1' tie: the smaller wins
    assert greedy_mode(boxes) == "620, 10, 700, 90"
    # '1' leads 2 of 3; after it '0' and '1' tie (the smaller wins), and "10" ends there
    assert greedy_mode(["9", "10", "11"]) == "10"
    assert greedy_mode(["5", "50", "50"]) == "50"  # the end of "5" loses to '0' (1 against 2)


def test_digit_mode_prior_differs_from_the_mean_box():
    records = [t2r("optic disc", [620, 100, 700, 180]), t2r("optic disc", [621, 101, 699, 181]),
               t2r("optic disc", [100, 100, 180, 180])]
    item = {"task": "t2r", "question": "Where is the <ref>optic disc</ref>?"}
    mean = parse_regions(PriorBaseline(records, "mean").answer(item)).boxes
    mode = parse_regions(PriorBaseline(records, "digit_mode").answer(item)).boxes
    assert mean == [[447, 100, 526, 180]]
    assert mode == [[620, 100, 700, 180]]
    with pytest.raises(ValueError, match="unknown prior"):
        PriorBaseline(records, "median")
