"""Metrics on generated text: corpus BLEU and ROUGE-L against several references, and the final number of a math
answer, extracted robustly and compared numerically.

BLEU is sacrebleu's (the field's reference implementation, whose scores are comparable across papers), multi-reference
and lowercased as the E2E NLG challenge scores it; ROUGE-L is Google's `rouge-score` (the implementation behind most
published ROUGE numbers), the best F-measure over an example's references, averaged. Both on a 0–100 scale.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0–100) of `predictions`, each against all of its references, lowercased; examples may have
    different numbers of references."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _streams(references), lowercase=True).score)


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per example, the sufficient statistics of corpus BLEU, in sacrebleu's order: hypothesis and closest reference
    length, matched n-grams for n = 1..4, total n-grams for n = 1..4, as `bleu` counts them. Corpus BLEU is a
    function of their sum, so summing any subset's rows gives that subset's BLEU: what a bootstrap over examples needs
    (`results.significance.bleu_from_statistics`)."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return []
    # sacrebleu has no public per-segment statistics; `corpus_bleu` sums these very rows (a test checks the sums).
    rows = BLEU(lowercase=True)._extract_corpus_statistics(list(predictions), _streams(references))
    return [[int(v) for v in row] for row in rows]


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu takes reference *streams*; a missing reference is None (ignored), not "" (which would count)."""
    most = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the best ROUGE-L F-measure against the example's references (0–100)."""
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." every call
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
        for pred, refs in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


# --- math answers ----------------------------------------------------------------------------------------------------

ANSWER_RULES = ("boxed", "hashes", "answer_is", "last_number", "none")
"""Extraction rules, in the order they are tried; `none`: the text has no number at all."""

# A number as people write it: `-3`, `$1,234.50`, `.5`, `3/4`; a minus sign right after a word or digit is an operator
# (`16-3`), not a sign.
_NUMBER = r"(?<![\w.])-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d[\d,]*(?:\.\d+)?)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s+is\s*[:=]?\s*", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final answer of a worked solution and the rule that found it (`ANSWER_RULES`): the last `\\boxed{...}`;
    else what follows the last `####`; else what follows the last "The (final) answer is"; else the last number in the
    text. The answer is returned as written (commas, `$`, `%` included); `as_number` reads it."""
    boxed = _last_boxed(text)
    if boxed is not None and _first_number(boxed) is not None:
        return _first_number(boxed), "boxed"
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1].split("\n", 1)[0])
        if found is not None:
            return found, "hashes"
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        found = _first_number(text[matches[-1].end() :].split("\n", 1)[0])
        if found is not None:
            return found, "answer_is"
    numbers = _NUMBER_RE.findall(_FRAC.sub(r"\1/\2", text))
    if numbers:
        return numbers[-1].strip(), "last_number"
    return None, "none"


def as_number(text: str | None) -> Fraction | None:
    """A written number as an exact fraction: `$1,234.50` → 2469/2, `50%` → 50, `3/4` and `0.75` → 3/4; None when it
    is not a number."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace("%", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def same_number(predicted: str | None, gold: str) -> bool:
    """Whether two written numbers are equal as numbers (`18.00` = `18`, `1/2` = `0.5`)."""
    a, b = as_number(predicted), as_number(gold)
    return a is not None and b is not None and a == b


def answer_matches(predictions: Sequence[str], answers: Sequence[str]) -> tuple[list[bool], dict[str, int]]:
    """Per prediction, whether its extracted final number equals the answer, and how often each extraction rule was
    the one that applied."""
    rules: Counter[str] = Counter({rule: 0 for rule in ANSWER_RULES})
    matches = []
    for prediction, answer in zip(predictions, answers, strict=True):
        found, rule = extract_answer(prediction)
        rules[rule] += 1
        matches.append(same_number(found, answer))
    return matches, dict(rules)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> tuple[float, dict[str, int]]:
    """Share (0–1) of predictions whose extracted final number equals the answer, and the rule counts
    (`answer_matches`)."""
    matches, rules = answer_matches(predictions, answers)
    return (sum(matches) / len(matches) if matches else 0.0), rules


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced (`\\boxed{\\frac{1}{2}}` → `\\frac{1}{2}`)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _first_number(text: str) -> str | None:
    found = _NUMBER_RE.search(_FRAC.sub(r"\1/\2", text))
    return found.group(0).strip() if found else None
