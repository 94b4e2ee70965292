"""Scores of generated answers against references: exact match, VQA accuracy, and captioning's BLEU-4,
ROUGE-L and CIDEr (pycocoevalcap's own scorers; mixtune writes none of those).

VQA accuracy uses the VQAv2 evaluation's answer normalisation (punctuation, articles, number words,
contractions) and min(#matching human answers / 3, 1). With fewer than 3 human answers (a dataset with one
answer per question) the denominator is that count, so a correct single answer scores 1 rather than 1/3.
The official VQAv2 script also averages that score over the 10 leave-one-out subsets of its 10 answers,
which lowers a 3-match answer from 1.0 to 0.9; mixtune reports the plain formula, as most papers quote it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re

METRICS = ("exact_match", "vqa_accuracy", "bleu4", "rouge_l", "cider")

# The VQAv2 evaluation's tables (VQA/PythonEvaluationTools/vqaEval.py).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# Contractions as the evaluation spells them; it maps each one written without (some of) its apostrophes
# ("dont", "couldnt've") back to this spelling.
CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in CONTRACTIONS:
        gaps = [i for i, c in enumerate(word) if c == "'"]
        for keep in itertools.product((True, False), repeat=len(gaps)):
            if all(keep):
                continue
            drop = {g for g, k in zip(gaps, keep) if not k}
            table["".join(c for i, c in enumerate(word) if i not in drop)] = word
    return table


CONTRACTION_MAP = _contraction_table()


def normalize_vqa_answer(answer: str) -> str:
    """The VQAv2 evaluation's normalisation: punctuation, then number words, articles and contractions."""
    original = answer.replace("\n", " ").replace("\t", " ").strip()
    text = original
    for p in PUNCTUATION:  # the evaluation tests the original text for each mark, as here
        if (p + " " in original or " " + p in original) or COMMA_STRIP.search(original) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = PERIOD_STRIP.sub("", text)
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTION_MAP.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#human answers equal to the prediction / 3, 1), both normalised (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(a) == pred for a in answers)
    return min(matches / min(3, len(answers)), 1.0)


def exact_match(prediction: str, references: list[str]) -> float:
    """1 if the prediction equals one of the references (surrounding whitespace ignored), else 0."""
    return float(any(prediction.strip() == r.strip() for r in references))


def caption_tokens(text: str) -> str:
    """Lower-case words with punctuation dropped: what pycocoevalcap's (Java) PTB tokenizer feeds its
    scorers, done in Python so no Java is needed."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr(-D) over (prediction, its references) pairs, by pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}


def score(predictions: list[str], references: list[list[str]], metrics=METRICS) -> dict[str, float]:
    """Mean of each asked metric over the samples that have references."""
    pairs = [(p, r) for p, r in zip(predictions, references) if r]
    if not pairs:
        return {}
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {list(METRICS)}")
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        out["exact_match"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
    if "vqa_accuracy" in metrics:
        out["vqa_accuracy"] = sum(vqa_accuracy(p, r) for p, r in pairs) / len(pairs)
    caption = [m for m in ("bleu4", "rouge_l", "cider") if m in metrics]
    if caption:
        scores = caption_scores(preds, refs)
        out.update({m: scores[m] for m in caption})
    out["samples"] = len(pairs)
    return out
