"""Task metrics of generated text against references, in percent (0-100, higher is better).

- exact match and token F1: SQuAD's definitions (Rajpurkar et al. 2016). Both compare
  normalised answers: lower case, punctuation removed, the articles a/an/the removed,
  whitespace collapsed. F1 is over the multiset of normalised words; the mean over examples.
- ROUGE-L: the F-measure of the longest common subsequence of words (`rouge-score`, Google's
  reference implementation), the mean over examples.
- BLEU: corpus BLEU with sacrebleu's standard settings (13a tokenization, exp smoothing), the
  number papers report.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
METRICS = ("exact_match", "f1", "rouge_l", "bleu")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall after normalisation (1 if both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure, in percent."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
              for prediction, reference in zip(predictions, references)]
    return 100 * sum(scores) / max(len(scores), 1)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (one reference per example), in percent."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) if predictions else 0.0


@dataclass
class TaskScores:
    task: str
    examples: int
    exact_match: float
    f1: float
    rouge_l: float
    bleu: float

    def to_dict(self) -> dict:
        return asdict(self)


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> TaskScores:
    """Every metric of one task's predictions (one reference each)."""
    if len(predictions) != len(references):
        raise ValueError(f"task {task}: {len(predictions)} predictions for {len(references)} references")
    count = max(len(predictions), 1)
    return TaskScores(
        task=task,
        examples=len(predictions),
        exact_match=100 * sum(map(exact_match, predictions, references)) / count,
        f1=100 * sum(map(token_f1, predictions, references)) / count,
        rouge_l=rouge_l(predictions, references),
        bleu=bleu(predictions, references),
    )
