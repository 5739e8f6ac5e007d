"""Prediction and evaluation with a real trained checkpoint: odd inputs, files, the CLI, and evaluation that
reproduces the trainer's own test figures."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from sentiment.config import build_config
from sentiment.model import CheckpointError, LSTMClassifier
from sentiment.predict import (
    SentimentClassifier,
    SentimentEnsemble,
    ensemble_metrics,
    evaluate_texts,
    read_texts,
    write_logits,
    write_predictions,
)
from sentiment.training import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A BiLSTM trained for real on the fixture; its best/ folder and metrics."""
    run = tmp_path_factory.mktemp("predict") / "run"
    values = {
        "dataset": str(hub_imdb),
        "output_dir": str(run),
        "epochs": 3,
        "batch_size": 8,
        "hidden_dim": 16,
        "bidirectional": True,
        "lr": 0.01,
        "dropout": 0.1,
        "report_to": "none",
        "num_proc": 1,
    }
    metrics = train(build_config(None, values))
    return run / "best", metrics


def test_classifier_matches_the_model(checkpoint: tuple[Path, dict]) -> None:
    """The bundled classifier's logits are the model's own on the same ids, in the order given."""
    best, _ = checkpoint
    classifier = SentimentClassifier.from_pretrained(best, device="cpu")
    texts = ["A wonderful, moving film.<br />I loved it.", "Awful and boring.", "great great great awful"]
    logits = classifier.logits(texts)
    model = LSTMClassifier.from_pretrained(best).eval()
    for text, logit in zip(texts, logits, strict=True):
        ids = torch.from_numpy(classifier.encode([text])[0]).unsqueeze(0)
        with torch.no_grad():
            expected = model(ids, torch.tensor([ids.shape[1]])).item()
        assert logit == pytest.approx(expected, abs=1e-5)
    predictions = classifier(texts)
    for prediction, logit in zip(predictions, logits, strict=True):
        assert prediction["label"] == ("pos" if logit > 0 else "neg")
        assert prediction["score"] == pytest.approx(1 / (1 + np.exp(-abs(logit))), abs=1e-6)


def test_batching_does_not_change_scores(checkpoint: tuple[Path, dict]) -> None:
    """Length-sorted batches of any size give each text the score it gets alone."""
    best, _ = checkpoint
    classifier = SentimentClassifier.from_pretrained(best, device="cpu")
    texts = [("loved it " * n) + "awful" * (n % 3) for n in range(1, 12)]
    alone = np.array([classifier.logits([t])[0] for t in texts])
    classifier.batch_size = 4
    np.testing.assert_allclose(classifier.logits(texts), alone, atol=1e-5)


def test_odd_inputs_get_answers(checkpoint: tuple[Path, dict]) -> None:
    """Empty, whitespace, non-English, unknown words, None and a text of hundreds of thousands of characters."""
    best, _ = checkpoint
    classifier = SentimentClassifier.from_pretrained(best, device="cpu")
    texts = ["", "   \n ", "これは素晴らしい映画です", "zxqvblorf", None, "great " * 100_000]
    predictions = classifier(texts)  # type: ignore[arg-type]
    assert len(predictions) == len(texts)
    for prediction in predictions:
        assert prediction["label"] in ("pos", "neg")
        assert 0.5 <= prediction["score"] <= 1.0
    # An empty text is scored as a single <unk>: the same as one unknown word.
    assert predictions[0]["score"] == pytest.approx(predictions[3]["score"])
    assert predictions[5]["label"] == classifier(["great " * 50])[0]["label"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
@pytest.mark.parametrize("out_suffix", [".jsonl", ".csv"])
def test_file_round_trip(checkpoint: tuple[Path, dict], tmp_path: Path, suffix: str, out_suffix: str) -> None:
    """`sentiment predict --input F --output G` writes one row per review with the classifier's own answers."""
    best, _ = checkpoint
    texts = ["A wonderful film, brilliant and moving.", "Dull, stupid, a waste.", "It was a film.", ""]
    source = tmp_path / f"reviews{suffix}"
    if suffix == ".txt":
        source.write_text("\n".join(texts) + "\n")
    elif suffix == ".jsonl":
        source.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        with open(source, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows({"id": i, "text": t} for i, t in enumerate(texts))
    assert read_texts(source) == texts
    output = tmp_path / f"predictions{out_suffix}"
    result = run_cli(
        "predict", "--model", str(best), "--input", str(source), "--output", str(output), "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    if out_suffix == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    else:
        with open(output, newline="") as handle:
            rows = list(csv.DictReader(handle))
    expected = SentimentClassifier.from_pretrained(best, device="cpu")(texts)
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert [float(r["score"]) for r in rows] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    assert not list(tmp_path.glob(".*tmp"))


def test_predict_cli_prints_a_line_per_text(checkpoint: tuple[Path, dict]) -> None:
    best, _ = checkpoint
    result = run_cli("predict", "--model", str(best), "A wonderful film.", "Awful, boring.", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t")[0] in ("pos", "neg") and lines[0].endswith("A wonderful film.")


def test_evaluate_reproduces_the_trainers_test_figures(
    checkpoint: tuple[Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """`sentiment evaluate` on the test split (split as the trainer splits) gives the trainer's test accuracy
    and loss, plus precision, recall, F1 and a confusion matrix that add up."""
    best, metrics = checkpoint
    output = tmp_path / "eval.json"
    result = run_cli(
        "evaluate", "--model", str(best), "--dataset", str(hub_imdb), "--output", str(output), "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout
    figures = json.loads(output.read_text())
    assert figures["count"] == metrics["sizes"]["test"]
    assert figures["accuracy"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert figures["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    matrix = figures["confusion_matrix"]
    tp, fp = matrix["true_pos"]["pred_pos"], matrix["true_neg"]["pred_pos"]
    fn, tn = matrix["true_pos"]["pred_neg"], matrix["true_neg"]["pred_neg"]
    assert tp + fp + fn + tn == figures["count"]
    assert figures["accuracy"] == pytest.approx((tp + tn) / figures["count"])
    assert figures["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert figures["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)


def test_evaluate_saves_logits_that_scripts_ensemble_combines(
    checkpoint: tuple[Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """`sentiment evaluate --logits` saves each review's logit and label (the split's order): they give the printed
    accuracy and equal those the trainer saved in its run folder. scripts/ensemble.py over two runs holding such
    files tabulates both and their ensemble (here the same model twice: the ensemble scores as the model)."""
    best, _ = checkpoint
    (tmp_path / "a").mkdir()
    for split in ("validation", "test"):
        output, logits = tmp_path / f"a-{split}.json", tmp_path / "a" / f"{split}-logits.npz"
        result = run_cli("evaluate", "--model", str(best), "--dataset", str(hub_imdb), "--split", split,
                         "--output", str(output), "--logits", str(logits), "--device", "cpu")  # fmt: skip
        assert result.returncode == 0, result.stderr
        with np.load(logits) as saved:
            assert saved["logits"].shape == saved["labels"].shape == (json.loads(output.read_text())["count"],)
            accuracy = float(np.mean((saved["logits"] > 0) == saved["labels"]))
        assert accuracy == pytest.approx(json.loads(output.read_text())["accuracy"], abs=1e-12)
        with np.load(logits) as by_cli, np.load(best.parent / f"{split}-logits.npz") as by_trainer:
            assert np.array_equal(by_cli["labels"], by_trainer["labels"])  # the same reviews, the same order
            np.testing.assert_allclose(by_cli["logits"], by_trainer["logits"], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob("*/.*tmp*"))  # written through a temp file, nothing left beside
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same model's logits again: a second member
    table = tmp_path / "ensemble.json"
    result = subprocess.run(
        [sys.executable, "scripts/ensemble.py", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| ensemble |" in result.stdout
    record = json.loads(table.read_text())
    figures = record["splits"]
    for split, prefix in (("validation", "valid"), ("test", "test")):
        member = figures[split][str(tmp_path / "a")]
        assert figures[split]["ensemble"]["accuracy"] == member["accuracy"] == record[f"{prefix}_acc"]
        assert figures[split]["ensemble"]["loss"] == pytest.approx(member["loss"], rel=1e-6)
        assert record[f"{prefix}_loss"] == figures[split]["ensemble"]["loss"]
    assert record["members"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert "epoch_seconds_mean" not in record  # the evaluate-only folders have no metrics.json to time them by
    run = best.parent  # a training run's folder: its metrics.json times the members (an epoch of each, summed)
    result = subprocess.run([sys.executable, "scripts/ensemble.py", str(run), str(run), "--output", str(table)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    seconds = json.loads((run / "metrics.json").read_text())["epoch_seconds_mean"]
    assert json.loads(table.read_text())["epoch_seconds_mean"] == pytest.approx(2 * seconds)
    (tmp_path / "b" / "test-logits.npz").unlink()
    result = subprocess.run([sys.executable, "scripts/ensemble.py", str(tmp_path / "a"), str(tmp_path / "b")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "sentiment evaluate --model" in result.stderr


def test_ensemble_averages_the_members_probabilities(tmp_path: Path) -> None:
    """Three members, each wrong on another review with little confidence and right on the rest with much: the
    mean probability is right on all six; its logit is that of the mean probability. Other labels are refused."""
    labels = np.array([1, 1, 1, 0, 0, 0])
    right = np.where(labels == 1, 3.0, -3.0)
    members = []
    for wrong in range(3):
        logits = right.copy()
        logits[wrong * 2] = -0.5 if labels[wrong * 2] == 1 else 0.5
        path = write_logits(tmp_path / f"m{wrong}.npz", logits, labels)
        with np.load(path) as saved:
            members.append((saved["logits"], saved["labels"]))
    figures = ensemble_metrics(members)
    assert figures["accuracy"] == 1.0
    confident = 1 / (1 + np.exp(-3.0))  # each member's probability of the right label where it is right
    one_wrong = (1 / (1 + np.exp(0.5)) + 2 * confident) / 3  # reviews 0, 2, 4: one member wrong
    expected_loss = -(3 * np.log(one_wrong) + 3 * np.log(confident)) / 6
    assert figures["loss"] == pytest.approx(expected_loss, rel=1e-5)
    with pytest.raises(ValueError, match="another split"):
        ensemble_metrics([members[0], (members[1][0], 1 - labels)])
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        write_logits(tmp_path / "m.npy", right, labels)


def test_evaluate_texts_on_known_answers(checkpoint: tuple[Path, dict]) -> None:
    """Metrics computed from the classifier's own predictions: labels equal to its predictions give 1.0."""
    best, _ = checkpoint
    classifier = SentimentClassifier.from_pretrained(best, device="cpu")
    texts = ["wonderful brilliant loved", "awful boring worst", "great fun", "dull waste"]
    own = [int(p["label"] == "pos") for p in classifier(texts)]
    figures = evaluate_texts(classifier, texts, own)
    assert figures["accuracy"] == 1.0
    flipped = evaluate_texts(classifier, texts, [1 - y for y in own])
    assert flipped["accuracy"] == 0.0


def test_bad_inputs_give_clear_errors(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    best, _ = checkpoint
    (tmp_path / "reviews.xml").write_text("<r/>")
    (tmp_path / "no_text.csv").write_text("id,review\n1,good\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    for name, message in (
        ("reviews.xml", ".txt, .jsonl or .csv"),
        ("no_text.csv", "'text' column"),
        ("bad.jsonl", "line 2 is not JSON"),
        ("missing.txt", "not found"),
    ):
        with pytest.raises(ValueError, match=message):
            read_texts(tmp_path / name)
    with pytest.raises(ValueError, match=r"\.jsonl or \.csv"):
        write_predictions(tmp_path / "out.txt", ["a"], [{"label": "pos", "score": 0.9}])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        empty = tmp_path / "no_tokenizer"
        empty.mkdir()
        for name in ("model.safetensors", "config.json"):
            (empty / name).write_bytes((best / name).read_bytes())
        SentimentClassifier.from_pretrained(empty)
    result = run_cli("predict", "--model", str(best))
    assert result.returncode == 2 and "nothing to score" in result.stderr


def test_evaluate_from_a_prepared_folder(hub_imdb: Path, tmp_path: Path) -> None:
    """`sentiment evaluate --prepared DIR` scores the prepared token ids (no spaCy, no datasets) and gives the
    trainer's own test figures for a run trained from that folder."""
    prepared = tmp_path / "prepared"
    result = run_cli("prepare", "--dataset", str(hub_imdb), "--num_proc=1", f"--output_dir={prepared}")
    assert result.returncode == 0, result.stderr
    values = {
        "prepared": str(prepared),
        "output_dir": str(tmp_path / "run"),
        "epochs": 2,
        "batch_size": 8,
        "hidden_dim": 8,
        "report_to": "none",
    }
    metrics = train(build_config(None, values))
    output = tmp_path / "eval.json"
    result = run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "run" / "best"),
        "--prepared",
        str(prepared),
        "--output",
        str(output),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert figures["count"] == metrics["sizes"]["test"]
    assert figures["accuracy"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert figures["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    # --max_eval_samples cuts the folder's test split as a training run's does: the same 20 reviews
    cut = train(build_config(None, {**values, "output_dir": str(tmp_path / "cut"), "max_eval_samples": 20}))
    result = run_cli("evaluate", "--model", str(tmp_path / "cut" / "best"), "--prepared", str(prepared),
                 "--max_eval_samples=20", "--output", str(output), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert figures["count"] == cut["sizes"]["test"] == 20
    assert figures["accuracy"] == pytest.approx(cut["test_acc"], abs=1e-9)


def test_checkpoint_code_needs_neither_spacy_nor_datasets_to_import() -> None:
    """Training from a prepared folder, evaluating from one and loading checkpoints import neither library, so a
    GPU machine without them can run them."""
    code = (
        "import sys, sentiment.cli, sentiment.training, sentiment.predict, sentiment.hub; "
        "print(sorted(m for m in ('spacy', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_ensemble_of_a_forward_and_a_backward_checkpoint(hub_imdb: Path, tmp_path: Path) -> None:
    """ULMFiT's pair as one predictor: a forward and a backward (``reverse``) LSTM trained from one prepared folder.
    `SentimentEnsemble` scores the logit of the members' mean probability; `sentiment evaluate --model A,B` gives
    the figures scripts/ensemble.py computes from the two runs' saved test logits; `sentiment predict --model A,B`
    labels by the ensemble; a malformed list is refused."""
    prepared = tmp_path / "prepared"
    result = run_cli("prepare", "--dataset", str(hub_imdb), "--num_proc=1", f"--output_dir={prepared}")
    assert result.returncode == 0, result.stderr
    runs = []
    for name, reverse in (("forward", False), ("backward", True)):
        values = {"prepared": str(prepared), "output_dir": str(tmp_path / name), "epochs": 2, "batch_size": 8,
                  "hidden_dim": 8, "lr": 0.01, "reverse": reverse, "report_to": "none"}  # fmt: skip
        train(build_config(None, values))
        runs.append(tmp_path / name)
    ensemble = SentimentEnsemble.from_pretrained([run / "best" for run in runs], device="cpu")
    assert [m.model.reverse for m in ensemble.members] == [False, True]
    texts = ["A wonderful, moving film.", "Awful and boring, a waste.", "great fun but far too long"]
    member_logits = [SentimentClassifier.from_pretrained(run / "best", device="cpu").logits(texts) for run in runs]
    assert not np.allclose(member_logits[0], member_logits[1])  # two different models
    mean_probability = np.mean([1 / (1 + np.exp(-logits.astype(np.float64))) for logits in member_logits], axis=0)
    np.testing.assert_allclose(1 / (1 + np.exp(-ensemble.logits(texts))), mean_probability, rtol=1e-6)
    assert [p["label"] for p in ensemble(texts)] == ["pos" if p > 0.5 else "neg" for p in mean_probability]

    output = tmp_path / "eval.json"
    spec = ",".join(str(run / "best") for run in runs)
    result = run_cli(
        "evaluate", "--model", spec, "--prepared", str(prepared), "--output", str(output), "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    saved = []
    for run in runs:
        with np.load(run / "test-logits.npz") as logits:
            saved.append((logits["logits"], logits["labels"]))
    expected = ensemble_metrics(saved)
    figures = json.loads(output.read_text())
    assert figures["count"] == expected["count"] and figures["accuracy"] == pytest.approx(expected["accuracy"])
    assert figures["loss"] == pytest.approx(expected["loss"], rel=1e-4)

    result = run_cli("predict", "--model", spec, "--device", "cpu", *texts)
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()] == [p["label"] for p in ensemble(texts)]
    result = run_cli("predict", "--model", spec + ",", "good")
    assert result.returncode != 0 and "empty entry" in result.stderr


def test_classification_metrics_of_known_logits() -> None:
    """Six reviews whose counts are known (2 true positives, 1 false positive, 2 false negatives, 1 true negative; a
    logit of exactly 0 predicts negative), and a model that never predicts positive (precision 0, not a division
    by zero)."""
    from sentiment.predict import classification_metrics

    figures = classification_metrics(np.array([2.0, -1.0, 0.5, -3.0, 0.0, 4.0]), [1, 0, 0, 1, 1, 1])
    assert figures["confusion_matrix"] == {
        "true_neg": {"pred_neg": 1, "pred_pos": 1},
        "true_pos": {"pred_neg": 2, "pred_pos": 2},
    }
    assert figures["count"] == 6
    assert figures["accuracy"] == pytest.approx(3 / 6)
    assert figures["precision"] == pytest.approx(2 / 3)
    assert figures["recall"] == pytest.approx(2 / 4)
    assert figures["f1"] == pytest.approx(4 / 7)
    expected_loss = np.mean(np.log1p(np.exp(-np.array([2.0, 1.0, -0.5, -3.0, 0.0, 4.0]))))
    assert figures["loss"] == pytest.approx(expected_loss)
    silent = classification_metrics(np.array([-1.0, -2.0, -0.5]), [1, 0, 1])
    assert (silent["precision"], silent["recall"], silent["f1"], silent["accuracy"]) == (0.0, 0.0, 0.0, 1 / 3)
