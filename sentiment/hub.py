"""The Hugging Face Hub side of a checkpoint: its model card and its push.

``write_model_card(checkpoint_dir, run_dir)`` writes ``checkpoint_dir/README.md`` with huggingface_hub's
``ModelCard`` / ``ModelCardData``: Hub metadata (library, tags, dataset, license, ``model-index`` with the test
figures) and a body describing the network, how to load it, the training config, the per-epoch figures and the
curves (``curves.png``, copied beside the card).

``push_checkpoint(checkpoint_dir, repo_id)`` uploads a checkpoint folder (``model.safetensors``, ``config.json``,
``tokenizer.json`` and whatever else it holds: the card, the curves) to a model repo in one commit. It never
writes to the folder; every failure (no token, offline, no network, refused token) is a ``HubError`` that says
what went wrong and how to fix it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled, get_token

from sentiment.files import atomic_path

logger = logging.getLogger(__name__)

LIBRARY_NAME = "sentiment-lstm"
DATASET_ID = "stanfordnlp/imdb"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json")
CARD_NAME = "README.md"
CURVES_NAME = "curves.png"
# Never uploaded: the temporary files of an interrupted write (``.README.md.tmp``, ...).
PUSH_IGNORE_PATTERNS = [".*", "*/.*", "*.tmp"]
# Config keys about where and how the run folder was written, not about the model: left out of the card.
RUN_MANAGEMENT_KEYS = ("output_dir", "overwrite", "resume")


class HubError(ValueError):
    """A model card or a push cannot be made; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------- model card

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A {{ kind_long }} that classifies the sentiment of English movie reviews (positive or negative), trained on
[IMDB](https://huggingface.co/datasets/{{ dataset_id }}) with `sentiment-lstm`.

A review is split into words by spaCy (`spacy.blank("en")`), mapped to ids by the WordLevel vocabulary in
`tokenizer.json`, embedded, and read by the {{ kind }}. {{ features }}
goes through dropout and a linear layer to one logit: `sigmoid(logit)` is the probability that the review is positive.

| | |
|---|---|
{{ model_table }}

## How to use

Install the `sentiment-lstm` package (its repository: `pip install -e .`), then:

```python
from sentiment.predict import SentimentClassifier

clf = SentimentClassifier.from_pretrained({{ model_ref }})
print(clf(["A wonderful film."]))  # [{'label': 'pos' or 'neg', 'score': probability of that label}]
```

`LSTMClassifier.from_pretrained(...)` (from `sentiment`) loads the bare network, `tokenizer.json` the vocabulary.
{% if config_table %}
## Training

Trained with `sentiment train` ({{ optimizer }}, binary cross-entropy on the logit), keeping the epoch with the best
validation accuracy. The run's config (`config.yaml`; the run-management keys `output_dir`, `overwrite` and `resume`
left out):

| key | value |
|---|---|
{{ config_table }}
{% endif %}{% if results %}
## Results

Selected epoch: {{ best_epoch }} of {{ epochs_run }} (validation accuracy {{ valid_acc }}).

| split | reviews | loss | accuracy |
|---|---|---|---|
{{ results_table }}

Per epoch:

| epoch | train loss | train acc | valid loss | valid acc | selected |
|---|---|---|---|---|---|
{{ history_table }}
{% if curves %}
![Loss and accuracy per epoch, train and validation]({{ curves }})
{% endif %}{% endif %}"""


def write_model_card(
    checkpoint_dir: str | Path,
    run_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    results: bool = True,
) -> Path:
    """Write ``checkpoint_dir/README.md``, the model card, and return its path.

    ``checkpoint_dir`` is a checkpoint folder (``config.json`` required: the architecture is read from it).
    ``run_dir`` is the run folder around it: its ``config.yaml`` gives the training config, its ``metrics.json``
    the results (``model-index``, test figures, per-epoch table) and its ``curves.png`` the curves, copied into
    the checkpoint as ``curves.png``. Without ``metrics.json`` (a card written mid-training), or with
    ``results=False``, the card has no results parts. ``repo_id`` is the hub id the loading example names
    (default: the checkpoint's path). The card and the curves are written through temporary files and renames.
    """
    checkpoint = Path(checkpoint_dir)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise HubError(
            f"{checkpoint} holds no config.json, so it is not a checkpoint folder; point at one written by training "
            "(runs/NAME/best, holding model.safetensors, config.json and tokenizer.json)"
        )
    model_config = json.loads(config_path.read_text())
    run = Path(run_dir) if run_dir is not None else None
    train_config = _read_yaml(run / "config.yaml") if run is not None else None
    metrics = _read_json(run / "metrics.json") if run is not None and results else None

    bidirectional = bool(model_config.get("bidirectional", False))
    model_name = _model_name(checkpoint, run, repo_id)
    tags = ["text-classification", "sentiment-analysis", "lstm", "imdb"]
    if bidirectional:
        tags.append("bilstm")
    eval_results = None
    if metrics is not None:
        common = {
            "task_type": "text-classification",
            "task_name": "Sentiment analysis",
            "dataset_type": DATASET_ID,
            "dataset_name": "IMDB",
            "dataset_config": "plain_text",
            "dataset_split": "test",
        }
        eval_results = [
            EvalResult(**common, metric_type="accuracy", metric_name="Test accuracy", metric_value=metrics["test_acc"]),
            EvalResult(**common, metric_type="loss", metric_name="Test loss (BCE)", metric_value=metrics["test_loss"]),
        ]
    card_data = ModelCardData(
        language="en",
        library_name=LIBRARY_NAME,
        license="apache-2.0",
        tags=tags,
        datasets=[DATASET_ID],
        metrics=["accuracy"],
        pipeline_tag="text-classification",
        model_name=model_name,
        eval_results=eval_results,
    )

    curves = None
    if metrics is not None and run is not None and (run / CURVES_NAME).is_file():
        with atomic_path(checkpoint / CURVES_NAME) as tmp:
            shutil.copyfile(run / CURVES_NAME, tmp)
        curves = CURVES_NAME

    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        dataset_id=DATASET_ID,
        kind="BiLSTM" if bidirectional else "LSTM",
        kind_long="bidirectional LSTM (BiLSTM)" if bidirectional else "LSTM",
        features=_features(_pooling(model_config, train_config), bidirectional),
        optimizer=_optimizer(train_config) if train_config else "",
        model_table=_model_table(model_config, train_config, checkpoint / "model.safetensors"),
        model_ref=json.dumps(repo_id or str(checkpoint)),
        config_table=_config_table(train_config) if train_config else "",
        results=metrics is not None,
        **(_results_parts(metrics) if metrics is not None else {}),
        curves=curves,
    )
    path = checkpoint / CARD_NAME
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path


def _read_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _model_name(checkpoint: Path, run: Path | None, repo_id: str | None) -> str:
    if repo_id:
        return repo_id.rstrip("/").split("/")[-1]
    if run is not None:
        return run.resolve().name
    return checkpoint.resolve().parent.name if checkpoint.resolve().name == "best" else checkpoint.resolve().name


def _cell(value: Any) -> str:
    """A value as a Markdown table cell (YAML spelling for null and booleans, ``|`` escaped)."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _count_parameters(weights: Path) -> int | None:
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


def _embedding_init(train_config: dict[str, Any] | None) -> str:
    if train_config is None:
        return "initialisation not recorded (no config.yaml)"
    vectors = str(train_config.get("vectors", "glove-6b-50d"))
    if vectors == "glove-6b-50d":
        text = "initialised from GloVe 6B 50d"
    elif vectors.lower() == "none":
        text = "randomly initialised (no pretrained vectors)"
    else:
        text = f"initialised from GloVe vectors `{Path(vectors.split('#')[-1]).name}`"
    if vectors.lower() != "none":
        text += f" (words without a vector: {train_config.get('oov_init', 'zeros')})"
    frozen = train_config.get("freeze_embeddings", False)
    return text + (", frozen during training" if frozen else ", fine-tuned during training")


def _pooling(model_config: dict[str, Any], train_config: dict[str, Any] | None) -> str:
    """The checkpoint's pooling (its ``config.json``; else the run's config; else ``last``, the only one once)."""
    return str(model_config.get("pooling") or (train_config or {}).get("pooling") or "last")


def _features(pooling: str, bidirectional: bool) -> str:
    """What the classifier layer reads, as the card's sentence subject, for ``pooling``."""
    outputs = "the top layer's outputs" + (" (both directions)" if bidirectional else "")
    if pooling == "max":
        return f"The element-wise maximum of {outputs} over the review's words"
    if pooling == "mean":
        return f"The mean of {outputs} over the review's words"
    if pooling == "concat":
        final = "the final hidden state" + (" of both directions" if bidirectional else "")
        return (
            f"The concatenation of {final} and the element-wise maximum and the mean of {outputs} over the "
            "review's words"
        )
    return "The final hidden state" + (" of both directions" if bidirectional else "")


def _optimizer(train_config: dict[str, Any]) -> str:
    """The run's optimizer as the card names it, with its weight decay when there is one."""
    optimizer = str(train_config.get("optimizer") or "adam")
    name = {"adam": "Adam", "adamw": "AdamW"}.get(optimizer, optimizer)
    decay = train_config.get("weight_decay") or 0
    return f"{name}, weight decay {decay}" if decay else name


def _model_table(model_config: dict[str, Any], train_config: dict[str, Any] | None, weights: Path) -> str:
    bidirectional = bool(model_config.get("bidirectional", False))
    layers = model_config.get("n_layers", 1)
    rows = [
        ("network", f"{'BiLSTM' if bidirectional else 'LSTM'}, {layers} layer{'s' if layers != 1 else ''}"),
        ("hidden size", f"{model_config.get('hidden_dim')}" + (" per direction" if bidirectional else "")),
        ("embedding dimension", f"{model_config.get('embedding_dim')}"),
        ("vocabulary", f"{model_config.get('vocab_size')} words (including `<unk>` and `<pad>`)"),
        ("embedding", _embedding_init(train_config)),
        ("pooling", f"`{_pooling(model_config, train_config)}`"),
        ("dropout", f"{model_config.get('dropout')}"),
        ("lowercase", f"{json.dumps(bool(model_config.get('lowercase', False)))}"),
        ("max length", f"{model_config.get('max_length') or 'none (full reviews)'}"),
    ]
    parameters = _count_parameters(weights)
    if parameters is not None:
        rows.append(("parameters", f"{parameters:,}"))
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _config_table(train_config: dict[str, Any]) -> str:
    rows = [f"| `{key}` | {_cell(value)} |" for key, value in train_config.items() if key not in RUN_MANAGEMENT_KEYS]
    return "\n".join(rows)


def _results_parts(metrics: dict[str, Any]) -> dict[str, Any]:
    """The template variables of the results section, from ``metrics.json``."""
    sizes = metrics.get("sizes", {})
    best = metrics.get("best_epoch")
    results_rows = [
        ("validation (selected epoch)", sizes.get("validation", ""), metrics["valid_loss"], metrics["valid_acc"]),
        ("test", sizes.get("test", ""), metrics["test_loss"], metrics["test_acc"]),
    ]
    history_rows = []
    for record in metrics.get("history", []):
        cells = [
            str(record["epoch"]),
            f"{record['train_loss']:.4f}",
            f"{record['train_acc']:.4f}",
            f"{record['valid_loss']:.4f}",
            f"{record['valid_acc']:.4f}",
            "yes" if record["epoch"] == best else "",
        ]
        history_rows.append("| " + " | ".join(cells) + " |")
    return {
        "best_epoch": best,
        "epochs_run": len(metrics.get("history", [])),
        "valid_acc": f"{metrics['valid_acc']:.4f}",
        "results_table": "\n".join(f"| {s} | {n} | {loss:.4f} | {acc:.4f} |" for s, n, loss, acc in results_rows),
        "history_table": "\n".join(history_rows),
    }


# ----------------------------------------------------------------------------------------------------- push


def require_push_access(repo_id: str, token: str | None = None) -> str:
    """The token to push with; a ``HubError`` now (no request made) when offline mode is on or no token is found.

    The trainer calls it before training when ``push_to_hub`` is set, so a push that cannot work fails before any
    work is done rather than after.
    """
    endpoint = _endpoint()
    if _offline():
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE). Unset HF_HUB_OFFLINE "
            "(and TRANSFORMERS_OFFLINE) on a machine with network access to the Hub, or drop push_to_hub"
        )
    try:
        token = token or get_token()
    except Exception as err:  # e.g. HF_OIDC_RESOURCE set but the token exchange failed (huggingface_hub >= 1.x)
        raise HubError(f"cannot push to {repo_id}: reading the Hugging Face token failed ({err})") from err
    if not token:
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token found. Log in with `huggingface-cli login` (or "
            f"`hf auth login`), or set HF_TOKEN to a token with write access ({endpoint}/settings/tokens)"
        )
    return token


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the checkpoint folder to the model repo ``repo_id`` in one commit; return the commit's URL.

    The folder must hold ``model.safetensors``, ``config.json`` and ``tokenizer.json``; every file in it (the card
    and curves too, hidden temporary files excepted) goes into one commit. The repo is created when missing
    (``private`` applies only then: pushing with ``private=True`` to an existing public repo is refused), the
    branch ``revision`` too (from ``main``). ``token`` defaults to ``HF_TOKEN`` or the logged-in token
    (``huggingface-cli login`` / ``hf auth login``); the Hub is ``HF_ENDPOINT`` (default https://huggingface.co).
    Nothing in the folder is written. Raises ``HubError`` when the folder is incomplete, no token is found, offline
    mode is on, the Hub cannot be reached, or it refuses the push; every check that needs no network (folder,
    offline mode, token) comes before the first request.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise HubError(f"checkpoint folder {folder} does not exist; pass a folder written by training (runs/NAME/best)")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise HubError(
            f"{folder} is not a complete checkpoint: {', '.join(missing)} missing (a checkpoint holds "
            f"{', '.join(CHECKPOINT_FILES)}). Push the best/ folder of a finished run, or train again"
        )
    endpoint = _endpoint()
    token = require_push_access(repo_id, token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id  # "name" alone lands in the token's namespace
        if private and not getattr(api.repo_info(repo_id), "private", True):
            raise HubError(
                f"{repo_id} already exists and is public on {endpoint}: private=True applies only to a new repo, so "
                "this push would publish the checkpoint. Make the repo private in its settings on the Hub, or push "
                "to a new repo"
            )
        if revision and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {LIBRARY_NAME} checkpoint {_model_name(folder, None, None)}",
            ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        )
    except HubError:
        raise
    except OfflineModeIsEnabled as err:
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE). Unset HF_HUB_OFFLINE and "
            "TRANSFORMERS_OFFLINE, then push again"
        ) from err
    except HfHubHTTPError as err:
        raise _http_error(err, repo_id, endpoint) from err
    except _network_errors() as err:
        raise HubError(
            f"could not reach the Hugging Face Hub at {endpoint} to push {repo_id} ({type(err).__name__}: "
            f"{str(err)[:200]}). Check the network connection and proxy settings, and HF_ENDPOINT if you set it"
        ) from err
    except ValueError as err:  # e.g. the Hub's verdict on the card's metadata
        raise HubError(f"the Hub refused the push to {repo_id}: {str(err)[:500]}") from err
    url = getattr(commit, "commit_url", None) or getattr(commit, "oid", None) or str(commit)
    logger.info("pushed %s to %s%s: %s", folder, repo_id, f" ({revision})" if revision else "", url)
    return str(url)


def _endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import), else the library's endpoint."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    """Offline mode as set now or when huggingface_hub was imported."""
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        value is not None and value.upper() in ("1", "ON", "YES", "TRUE") for value in values
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection, timeout and transport errors of the HTTP stacks huggingface_hub versions use."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module_name, names in (
        ("requests.exceptions", ("ConnectionError", "Timeout")),
        ("httpx", ("TransportError",)),
        ("httpx2", ("TransportError",)),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, name) for name in names if isinstance(getattr(module, name, None), type))
    return tuple(errors)


def _http_error(err: HfHubHTTPError, repo_id: str, endpoint: str) -> HubError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    detail = ((getattr(err, "server_message", None) or str(err)).strip().splitlines() or [""])[0][:300]
    login = (
        "Log in with a token that has write access: `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN "
        f"(tokens: {endpoint}/settings/tokens)"
    )
    if status == 401:
        return HubError(f"the Hub at {endpoint} did not accept the token (HTTP 401: {detail}). {login}")
    if status == 403:
        return HubError(
            f"the token has no write access to {repo_id} on {endpoint} (HTTP 403: {detail}). Push to your own "
            f"namespace or an organisation you can write to. {login}"
        )
    return HubError(f"the Hub at {endpoint} refused the push to {repo_id} (HTTP {status}: {detail})")
