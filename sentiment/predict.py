"""Prediction: a checkpoint (folder or hub id) plus its preprocessing, as one callable, and labelled evaluation.

``SentimentClassifier.from_pretrained(path_or_hub_id)`` bundles the spaCy pretokenization, the ``tokenizer.json``
vocabulary and the ``LSTMClassifier``; calling it on a list of reviews returns ``{"label", "score"}`` per review.
``SentimentEnsemble`` scores several checkpoints as one (their mean probability); ``load_classifier`` gives either.
Reviews are scored in length-sorted batches (on GPU when there is one); empty, foreign or very long texts give an
answer, never a crash.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from sentiment.batching import EncodedSplit, PadCollator
from sentiment.files import atomic_path
from sentiment.model import CheckpointError, LSTMClassifier
from sentiment.text import encode_tokens, pretokenize

LABELS = ("neg", "pos")
# Longer reviews are cut to their first MAX_TOKENS tokens (IMDB's longest has about 2,800): an LSTM over a
# million-token text would take minutes and learn nothing more.
MAX_TOKENS = 8192


def _tokenizer_file(path_or_id: str | Path, **hub_kwargs: Any) -> Path:
    local = Path(path_or_id)
    if local.is_dir():
        if not (local / "tokenizer.json").is_file():
            raise CheckpointError(f"{local} has no tokenizer.json; a checkpoint folder holds it beside the weights")
        return local / "tokenizer.json"
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path_or_id), "tokenizer.json", **hub_kwargs))
    except Exception as err:
        raise CheckpointError(
            f"could not get tokenizer.json of {path_or_id} ({type(err).__name__}: {str(err)[:200]}); pass a "
            "checkpoint folder (runs/NAME/best) or a hub id you can reach"
        ) from err


class _ReviewScorer:
    """What a scorer of reviews shares: labels and probabilities from its ``logits``."""

    def logits(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """One logit per text (positive > 0), in the order given."""
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], progress: bool = False) -> list[dict[str, Any]]:
        """``{"label": "pos"|"neg", "score": probability of that label}`` for each text."""
        logits = self.logits([texts] if isinstance(texts, str) else texts, progress=progress)
        positive = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
        return [{"label": LABELS[int(p > 0.5)], "score": float(p if p > 0.5 else 1 - p)} for p in positive]


class SentimentClassifier(_ReviewScorer):
    """Score movie reviews with a trained checkpoint: ``clf(["A wonderful film."])`` ->
    ``[{"label": "pos", "score": 0.97}]`` (``score`` is the probability of the returned label)."""

    def __init__(
        self,
        model: LSTMClassifier,
        tokenizer: Tokenizer,
        device: str | torch.device | None = None,
        batch_size: int = 256,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._collate = PadCollator(model.pad_id)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, device: str | torch.device | None = None, **hub_kwargs: Any
    ) -> SentimentClassifier:
        """Load ``model.safetensors``, ``config.json`` and ``tokenizer.json`` from a folder or a hub id."""
        model = LSTMClassifier.from_pretrained(path_or_id, **hub_kwargs)
        tokenizer = Tokenizer.from_file(str(_tokenizer_file(path_or_id, **hub_kwargs)))
        return cls(model, tokenizer, device=device)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids per text (spaCy words -> vocabulary ids), cut to ``max_tokens``."""
        return self.encode_words(_pretokenize(texts))

    def encode_words(self, words: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Token ids per already pretokenized text (``sentiment.text.pretokenize``), cut to ``max_tokens``."""
        return [np.asarray(x[: self.max_tokens], dtype=np.int64) for x in encode_tokens(self.tokenizer, words)]

    def logits(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """One logit per text (positive > 0), in the order given; computed in length-sorted batches."""
        return self.logits_of_ids(self.encode(texts), progress=progress)

    @torch.no_grad()
    def logits_of_ids(self, encoded: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        """One logit per already encoded text (token ids), in the order given."""
        encoded = [np.asarray(ids[: self.max_tokens], dtype=np.int64) for ids in encoded]
        order = np.argsort([-len(x) for x in encoded], kind="stable")
        logits = np.empty(len(encoded), dtype=np.float32)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
            rows = order[start : start + self.batch_size]
            batch = self._collate([(encoded[i], 0) for i in rows])
            output = self.model(batch["input_ids"].to(self.device), batch["lengths"])
            logits[rows] = output.float().cpu().numpy()
        return logits


class SentimentEnsemble(_ReviewScorer):
    """Several checkpoints scored as one model: the mean of their positive-class probabilities, e.g. ULMFiT's
    forward + backward pair, ``SentimentEnsemble.from_pretrained(["runs/ft-fwd/best", "runs/ft-bwd/best"])``
    (a backward checkpoint reverses the reviews itself). The reviews are pretokenized once; each member encodes
    them with its own ``tokenizer.json``. Called like :class:`SentimentClassifier`."""

    def __init__(self, members: Sequence[SentimentClassifier]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one checkpoint")
        self.members = list(members)

    @classmethod
    def from_pretrained(
        cls, paths_or_ids: Sequence[str | Path], device: str | torch.device | None = None, **hub_kwargs: Any
    ) -> SentimentEnsemble:
        """Load every member with :meth:`SentimentClassifier.from_pretrained`."""
        return cls([SentimentClassifier.from_pretrained(path, device=device, **hub_kwargs) for path in paths_or_ids])

    @property
    def batch_size(self) -> int:
        """The members' scoring batch size (setting it sets every member's)."""
        return self.members[0].batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        for member in self.members:
            member.batch_size = value

    def logits(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """One logit per text: that of the members' mean positive-class probability."""
        words = _pretokenize(texts)
        return mean_probability_logits(
            [member.logits_of_ids(member.encode_words(words), progress=progress) for member in self.members]
        )


def load_classifier(
    spec: str, device: str | torch.device | None = None, **hub_kwargs: Any
) -> SentimentClassifier | SentimentEnsemble:
    """A checkpoint folder or hub id, or several joined by commas (``runs/ft-fwd/best,runs/ft-bwd/best``): an
    ensemble of them. What ``sentiment predict`` and ``sentiment evaluate`` take as ``--model``."""
    paths = [part.strip() for part in spec.split(",")]
    if any(not path for path in paths):
        raise CheckpointError(f"--model {spec!r} has an empty entry: give checkpoints joined by single commas")
    if len(paths) == 1:
        return SentimentClassifier.from_pretrained(paths[0], device=device, **hub_kwargs)
    return SentimentEnsemble.from_pretrained(paths, device=device, **hub_kwargs)


def _pretokenize(texts: Sequence[str]) -> list[list[str]]:
    return pretokenize([t if isinstance(t, str) else "" for t in texts])


def evaluate_texts(
    classifier: SentimentClassifier | SentimentEnsemble, texts: Sequence[str], labels: Sequence[int]
) -> dict[str, Any]:
    """Loss (BCE), accuracy, precision, recall and F1 of the positive class, and the confusion matrix."""
    return classification_metrics(classifier.logits(texts, progress=True), labels)


def logits_of_prepared(
    classifier: SentimentClassifier | SentimentEnsemble, split: EncodedSplit, tokenizer: Tokenizer
) -> np.ndarray:
    """One logit per review of a split of a ``sentiment prepare`` folder (token ids made by ``tokenizer``), in the
    split's order: no spaCy needed, so a GPU machine without it can evaluate. The checkpoint (every member of an
    ensemble) must use the same vocabulary."""
    members = classifier.members if isinstance(classifier, SentimentEnsemble) else [classifier]
    vocabulary = json.loads(tokenizer.to_str())
    if any(json.loads(member.tokenizer.to_str()) != vocabulary for member in members):
        raise CheckpointError(
            "the prepared data was encoded with another tokenizer.json than the checkpoint's: evaluate from the "
            "raw dataset (--dataset) instead, or use the prepared folder the checkpoint was trained from"
        )
    ids = [split[i][0] for i in range(len(split))]
    if len(members) == 1:
        return members[0].logits_of_ids(ids, progress=True)
    return mean_probability_logits([member.logits_of_ids(ids, progress=True) for member in members])


def evaluate_prepared(
    classifier: SentimentClassifier | SentimentEnsemble, split: EncodedSplit, tokenizer: Tokenizer
) -> dict[str, Any]:
    """``evaluate_texts`` on a split of a ``sentiment prepare`` folder (see :func:`logits_of_prepared`)."""
    return classification_metrics(logits_of_prepared(classifier, split, tokenizer), split.labels.tolist())


def write_logits(path: str | Path, logits: np.ndarray, labels: Sequence[int]) -> Path:
    """Save one split's logits with its labels, in the split's order, as ``.npz`` (``logits``, ``labels``; temp
    file, then rename): what :func:`ensemble_metrics` combines across runs."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"logits file {path} must end in .npz")
    with atomic_path(path) as tmp:
        np.savez(tmp, logits=np.asarray(logits, dtype=np.float32), labels=np.asarray(labels, dtype=np.int8))
    return path


def ensemble_metrics(members: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """``classification_metrics`` of the mean positive-class probability of several models' ``(logits, labels)``
    on the same split (as :func:`write_logits` saves them); the labels must agree, review by review."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    labels = members[0][1]
    for number, (logits, member_labels) in enumerate(members, start=1):
        if len(logits) != len(labels) or not np.array_equal(member_labels, labels):
            raise ValueError(
                f"member {number} scored another split ({len(logits)} reviews, labels differ): ensemble logits of "
                "the same split of the same prepared data"
            )
    return classification_metrics(mean_probability_logits([logits for logits, _ in members]), labels.tolist())


def mean_probability_logits(member_logits: Sequence[np.ndarray]) -> np.ndarray:
    """The logit of the mean positive-class probability of several models' logits for the same reviews (how an
    ensemble scores: each member's sigmoid, averaged, mapped back to a logit; clipped to +-27.6)."""
    probability = np.mean([1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64))) for logits in member_logits], axis=0)
    probability = np.clip(probability, 1e-12, 1 - 1e-12)
    return np.log(probability / (1 - probability))


def classification_metrics(logits: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    """Loss (BCE), accuracy, precision, recall, F1 (positive class) and confusion matrix of logits vs labels, from
    ``torchmetrics``' binary classification metrics (a logit > 0 predicts positive). Accuracy is the confusion
    matrix's diagonal over the count, exactly as the trainer counts it (torchmetrics' rates are float32)."""
    from torchmetrics.functional.classification import (
        binary_confusion_matrix,
        binary_f1_score,
        binary_precision,
        binary_recall,
    )

    logits = torch.from_numpy(np.asarray(logits)).double()
    target = torch.tensor(list(labels), dtype=torch.long)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.double()).item()
    predicted = (logits > 0).long()  # thresholded here: torchmetrics would apply a sigmoid to values outside [0, 1]
    (tn, fp), (fn, tp) = binary_confusion_matrix(predicted, target).tolist()
    return {
        "count": len(target),
        "loss": loss,
        "accuracy": (tp + tn) / len(target),
        "precision": binary_precision(predicted, target).item(),
        "recall": binary_recall(predicted, target).item(),
        "f1": binary_f1_score(predicted, target).item(),
        "confusion_matrix": {
            "true_neg": {"pred_neg": tn, "pred_pos": fp},
            "true_pos": {"pred_neg": fn, "pred_pos": tp},
        },
    }


class ReviewFileError(ValueError):
    """A file of reviews to score (or of predictions to write) cannot be used; the message names the file, the
    line where there is one, and the fix."""


def read_texts(path: str | Path) -> list[str]:
    """Reviews from a ``.txt`` (one per line), ``.jsonl`` (a ``text`` field per line) or ``.csv`` (a ``text``
    column) file, UTF-8; a missing or malformed file is a ``ReviewFileError``."""
    path = Path(path)
    if not path.is_file():
        raise ReviewFileError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise ReviewFileError(f"input {path} must end in .txt, .jsonl or .csv")
    try:
        if suffix == ".txt":
            return path.read_text(encoding="utf-8").splitlines()
        if suffix == ".jsonl":
            return _read_jsonl_texts(path)
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise ReviewFileError(f"{path} needs a 'text' column (found {reader.fieldnames})")
            return [row["text"] or "" for row in reader]
    except UnicodeDecodeError as err:
        raise ReviewFileError(
            f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}): save it as UTF-8 and score it again"
        ) from None


def _read_jsonl_texts(path: Path) -> list[str]:
    example = json.dumps({"text": "A wonderful film."})
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fix = f'fix line {number} of {path}: each line must be a JSON object with a "text" field, e.g. {example}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReviewFileError(f"{path} line {number} is not JSON ({err.msg}: column {err.colno}); {fix}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ReviewFileError(f'{path} line {number} has no "text" field; {fix}')
        texts.append(str(record["text"] or ""))
    return texts


def write_predictions(path: str | Path, texts: Sequence[str], predictions: Sequence[dict[str, Any]]) -> Path:
    """Write ``text``, ``label``, ``score`` per review as ``.jsonl`` or ``.csv`` (temp file, then rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ReviewFileError(f"output {path} must end in .jsonl or .csv")
    rows = [{"text": text, **prediction} for text, prediction in zip(texts, predictions, strict=True)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        if suffix == ".jsonl":
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            writer = csv.DictWriter(handle, fieldnames=["text", "label", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return path
