"""Task metrics against values worked out by hand."""
from __future__ import annotations

import pytest

from moe_platform.generate.metrics import bleu, exact_match, normalize_answer, rouge_l, score, token_f1


def test_normalisation_is_squads():
    assert normalize_answer("  The Cat,  sat on  a MAT! ") == "cat sat on mat"
    assert normalize_answer("An apple; the end.") == "apple end"
    assert normalize_answer("theory") == "theory"  # articles are whole words only


def test_exact_match_and_f1_by_hand():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    # "cat sat on mat" vs "cat on mat": 3 words shared, precision 3/4, recall 3/3 -> F1 = 6/7.
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # A repeated word counts as often as both sides hold it: "dog dog" vs "dog": P 1/2, R 1 -> 2/3.
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0


def test_rouge_l_and_bleu_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on both sides: P = R = F = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(500 / 6)
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty): BLEU = 0.2 ** (1/4).
    assert bleu(["the quick brown fox runs"], ["the quick brown fox jumps"]) == pytest.approx(100 * 0.2 ** 0.25,
                                                                                              abs=1e-3)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_a_tasks_scores_are_means_over_its_examples():
    scores = score("qa", ["The cat.", "dog dog", "the cat sat on the mat"], ["cat", "dog", "cat on mat"])
    assert scores.examples == 3
    assert scores.exact_match == pytest.approx(100 / 3)
    assert scores.f1 == pytest.approx(100 * (1 + 2 / 3 + 6 / 7) / 3)
    with pytest.raises(ValueError, match="task qa: 1 predictions for 2 references"):
        score("qa", ["x"], ["x", "y"])
