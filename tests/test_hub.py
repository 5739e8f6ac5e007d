"""The Hub side (sentiment.hub): the model card of a real tiny run, and pushes to a Hub played by an HTTP server on
127.0.0.1 that implements the parts of the Hub's API huggingface_hub uses to create a repo and a branch, upload a
folder in one commit, and download files back (so ``LSTMClassifier.from_pretrained(repo_id)`` loads through it).

Nothing of huggingface_hub is mocked: the library talks HTTP to the fake Hub. Its settings read at import time
(endpoint, cache and token paths, offline flag) are pointed at temporary places for each test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, hf_hub_download
from test_training import tiny_config

from sentiment.hub import HubError, push_checkpoint, write_model_card
from sentiment.model import LSTMClassifier
from sentiment.predict import SentimentClassifier
from sentiment.training import train

USER = "tester"
TOKEN = "hf_fake_write_token_for_tests"
CALL_TIMEOUT = 60  # seconds: no call into huggingface_hub may take longer
LARGE_FILE = 10 * 1024 * 1024  # the fake Hub asks for LFS above this (and does not implement LFS)
PUSHED = ("model.safetensors", "config.json", "tokenizer.json", "README.md", "curves.png")


# ------------------------------------------------------------------------------------------------ the fake Hub


@dataclass
class Commit:
    """One commit of a fake repo: what it changed and the whole tree after it."""

    oid: str
    parent: str | None
    message: str
    added: dict[str, bytes]
    tree: dict[str, bytes]


@dataclass
class Repo:
    """A fake model repo: visibility, branches (name -> commit oid) and commits."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def history(self, branch: str) -> list[Commit]:
        """The commits of ``branch``, newest first."""
        commits, oid = [], self.branches.get(branch)
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits


@dataclass
class Response:
    """What the fake Hub answers: status, body and headers (Content-Length is added when sending)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, **headers: str) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})


def _error(status: int, message: str, code: str | None = None, **headers: str) -> Response:
    extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **headers}
    return _json(status, {"error": message}, **extra)


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """The Hub's HTTP API, as much as huggingface_hub needs to create repos and branches, commit a folder and
    download files; every request is logged as (method, path, status)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self.url = ""

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> Response:
        path = urlsplit(target).path  # still quoted: the parts are unquoted once split
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        user = self.tokens.get(token) if token else None
        with self._lock:
            response = self._route(method, path, user, token is not None, body)
            self.log.append((method, urlsplit(target).path, response.status))
        return response

    def _route(self, method: str, path: str, user: str | None, has_token: bool, body: bytes) -> Response:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(user, has_token, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if path == "/api/agent-harnesses":  # huggingface_hub >= 1.x fetches this registry once; the Hub may 404
            return _error(404, "not served by the fake Hub")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision)/(.+))?", path)
        if api:
            repo_id, action, revision = api.group(1), api.group(2), unquote(api.group(3) or "main")
            if method == "GET" and action in (None, "revision"):
                return self._repo_info(repo_id, revision, user, has_token)
            if method == "POST" and action is not None:
                return self._write(action, repo_id, revision, user, has_token, body)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve and method in ("GET", "HEAD"):
            repo_id, revision, filename = (unquote(part) for part in resolve.groups())
            return self._resolve(repo_id, revision, filename, user, has_token)
        self.unhandled.append((method, path))
        return _error(404, f"the fake Hub does not serve {method} {path}")

    # -- auth
    @staticmethod
    def _unauthorized(has_token: bool) -> Response:
        message = "Invalid credentials in Authorization header" if has_token else "Invalid username or password."
        return _error(401, message)

    def _readable(self, repo_id: str, user: str | None, has_token: bool) -> Repo | Response:
        if has_token and user is None:
            return self._unauthorized(True)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo_id.split("/")[0] != user):
            return _error(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    # -- endpoints
    def _create_repo(self, user: str | None, has_token: bool, payload: dict[str, Any]) -> Response:
        if user is None:
            return self._unauthorized(has_token)
        namespace = payload.get("organization") or user
        if namespace != user:
            return _error(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = self.repos[repo_id] = Repo(repo_id, private)
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self._commit(repo, "main", "initial commit", initial, deleted=[])
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> Response:
        match = re.match(r"^---\r?\n(.*?)\r?\n---", payload.get("content", ""), re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return _json(400, {"errors": [{"message": str(err)}], "warnings": []})
        if not isinstance(metadata, dict):
            return _json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _readable_commit(self, repo_id: str, revision: str, user: str | None, has_token: bool) -> Any:
        """The repository's commit at ``revision``, or the error response (not readable, no such revision)."""
        repo = self._readable(repo_id, user, has_token)
        if isinstance(repo, Response):
            return repo
        commit = repo.resolve(revision)
        return commit if commit is not None else _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _repo_info(self, repo_id: str, revision: str, user: str | None, has_token: bool) -> Response:
        commit = self._readable_commit(repo_id, revision, user, has_token)
        if isinstance(commit, Response):
            return commit
        repo = self.repos[repo_id]
        siblings = [{"rfilename": name} for name in sorted(commit.tree)]
        return _json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                           "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})  # fmt: skip

    def _write(
        self, action: str, repo_id: str, revision: str, user: str | None, has_token: bool, body: bytes
    ) -> Response:
        if user is None:
            return self._unauthorized(has_token)
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "Repository not found", "RepoNotFound")
        if repo_id.split("/")[0] != user:
            return _error(403, f"You don't have write access to {repo_id}")
        if action == "branch":
            if revision in repo.branches:
                return _error(409, "Reference already exists")
            start = repo.resolve(json.loads(body or b"{}").get("startingPoint") or "main")
            if start is None:
                return _error(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[revision] = start.oid
            return _json(200, {})
        head = repo.resolve(revision)
        if head is None or revision not in repo.branches:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["size"] > LARGE_FILE else "regular", "shouldIgnore": False,
                 "oid": None}
                for f in files
            ]  # fmt: skip
            return _json(200, {"files": modes, "commitOid": head.oid})
        return self._commit_ndjson(repo, revision, body)

    def _commit_ndjson(self, repo: Repo, branch: str, body: bytes) -> Response:
        message, added, deleted = "", {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
                if value.get("parentCommit") and value["parentCommit"] != repo.branches[branch]:
                    return _error(412, "A commit has happened since. Please refresh and try again.")
            elif item["key"] == "file":
                assert value.get("encoding") == "base64"
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return _error(400, f"the fake Hub does not take {item['key']!r} operations (keep test files small)")
        commit = self._commit(repo, branch, message, added, deleted)
        return _json(200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                           "pullRequestUrl": None})  # fmt: skip

    def _commit(self, repo: Repo, branch: str, message: str, added: dict[str, bytes], deleted: list[str]) -> Commit:
        parent = repo.branches.get(branch)
        tree = dict(repo.commits[parent].tree) if parent else {}
        for path in deleted:
            tree = {name: data for name, data in tree.items() if name != path and not name.startswith(path + "/")}
        tree.update(added)
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{branch}:{self._counter}:{message}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, dict(added), tree)
        repo.branches[branch] = oid
        return repo.commits[oid]

    def _resolve(self, repo_id: str, revision: str, filename: str, user: str | None, has_token: bool) -> Response:
        commit = self._readable_commit(repo_id, revision, user, has_token)
        if isinstance(commit, Response):
            return commit
        if filename not in commit.tree:
            return _error(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
        content = commit.tree[filename]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{_git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        return Response(200, content, headers)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) front of a FakeHub: reads the body (plain or chunked), answers ranges of downloads."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may stay silent
    hub: FakeHub

    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        response = self.hub.handle(self.command, self.path, self.headers, body)
        content, status = response.body, response.status
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and status == 200:
            start, end = int(ranged.group(1)), int(ranged.group(2) or len(content) - 1)
            response.headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self.send_response(status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_HEAD = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@contextlib.contextmanager
def serve(hub: FakeHub) -> Iterator[str]:
    """Serve ``hub`` on 127.0.0.1 (a free port) in a thread; yield its URL."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------- helpers


def bounded(function: Callable[..., Any], *args: Any, timeout: float = CALL_TIMEOUT, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a daemon thread, failing the test if it runs past ``timeout`` seconds
    (huggingface_hub's HTTP client has no timeout of its own on most calls)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} still running after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def folder_hashes(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``folder``, hidden ones included."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a Markdown text."""
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hub_run(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A real tiny BiLSTM run on the fixture data, with its model card written into best/."""
    run_dir = tmp_path_factory.mktemp("hub_runs") / "bilstm-tiny"
    metrics = train(tiny_config(hub_imdb, run_dir, epochs=2, batch_size=8, hidden_dim=8))
    write_model_card(run_dir / "best", run_dir)
    return run_dir, metrics


def set_hub_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: Any) -> None:
    """Set huggingface_hub's import-time setting ``name``: in ``huggingface_hub.constants`` and in every module of
    the library that copied it at import (``from .constants import ENDPOINT`` in some versions)."""
    old = getattr(constants, name, None)
    monkeypatch.setattr(constants, name, value, raising=False)
    for module_name, module in list(sys.modules.items()):
        copy = vars(module).get(name, None) if module_name.startswith("huggingface_hub.") else None
        if module is not constants and copy is not None and type(copy) is type(old) and copy == old:
            monkeypatch.setattr(module, name, value)


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HF_HOME (no stored token, empty cache), no token or offline flag in the environment.

    huggingface_hub reads its paths and flags once, at import: they are redirected where it keeps them too.
    """
    home = tmp_path / "hf_home"
    home.mkdir()
    old_home = constants.HF_HOME
    for name in dir(constants):
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            set_hub_setting(monkeypatch, name, str(home) + value[len(old_home) :])
    overrides = {"HF_HUB_CACHE": home / "hub", "HUGGINGFACE_HUB_CACHE": home / "hub", "HF_TOKEN_PATH": home / "token",
                 "HF_STORED_TOKENS_PATH": home / "stored_tokens", "HF_XET_CACHE": home / "xet"}  # fmt: skip
    for name, value in overrides.items():
        if hasattr(constants, name):
            set_hub_setting(monkeypatch, name, str(value))
    set_hub_setting(monkeypatch, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    return home


def point_at(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``url`` the Hub: HF_ENDPOINT, and the settings huggingface_hub derived from it at import."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    set_hub_setting(monkeypatch, "ENDPOINT", url)
    set_hub_setting(monkeypatch, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def fake_hub(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub, running, with HF_ENDPOINT pointing at it; TOKEN is the write token of USER."""
    hub = FakeHub({TOKEN: USER})
    with serve(hub) as url:
        point_at(url, monkeypatch)
        yield hub


# ------------------------------------------------------------------------------------------------ the card


def test_model_card_of_a_real_run(hub_run: tuple[Path, dict[str, Any]]) -> None:
    """The card parses with ModelCard.load; its metadata and model-index carry the run's figures; the body holds
    the model, the config, the per-epoch table and the curves, copied beside it; its Python example compiles."""
    run_dir, metrics = hub_run
    best = run_dir / "best"
    card = ModelCard.load(best / "README.md")
    data = card.data
    assert data.library_name == "sentiment-lstm"
    assert data.datasets == ["stanfordnlp/imdb"]
    assert data.license == "apache-2.0"
    assert data.metrics == ["accuracy"]
    assert set(data.tags) == {"text-classification", "sentiment-analysis", "lstm", "imdb", "bilstm"}
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    accuracy = [r for r in data.eval_results if r.metric_type == "accuracy"]
    loss = [r for r in data.eval_results if r.metric_type == "loss"]
    assert len(accuracy) == len(loss) == 1
    assert accuracy[0].metric_value == on_disk["test_acc"] == metrics["test_acc"]
    assert loss[0].metric_value == on_disk["test_loss"]
    for result in accuracy + loss:
        assert (result.task_type, result.dataset_type, result.dataset_split) == (
            "text-classification",
            "stanfordnlp/imdb",
            "test",
        )
    model_index = data.to_dict()["model-index"]
    assert model_index[0]["results"][0]["dataset"]["type"] == "stanfordnlp/imdb"

    text = card.text
    config = json.loads((best / "config.json").read_text())
    assert "BiLSTM, 1 layer" in text
    assert f"| hidden size | {config['hidden_dim']} per direction |" in text
    assert f"| embedding dimension | {config['embedding_dim']} |" in text
    assert f"| vocabulary | {config['vocab_size']} words" in text
    assert "GloVe 6B 50d" in text
    for record in on_disk["history"]:
        selected = "yes" if record["epoch"] == on_disk["best_epoch"] else ""
        row = (
            f"| {record['epoch']} | {record['train_loss']:.4f} | {record['train_acc']:.4f} | "
            f"{record['valid_loss']:.4f} | {record['valid_acc']:.4f} | {selected} |"
        )
        assert row in text, row
    assert f"| test | 60 | {on_disk['test_loss']:.4f} | {on_disk['test_acc']:.4f} |" in text
    assert "| `hidden_dim` | `8` |" in text and "| `bidirectional` | `true` |" in text
    assert "| `output_dir` |" not in text  # the local run folder stays out of a public card
    assert re.search(r"!\[[^\]]*\]\(curves\.png\)", text)
    assert (best / "curves.png").read_bytes() == (run_dir / "curves.png").read_bytes()
    assert not list(best.glob(".*")), "temporary files left behind"

    blocks = python_blocks(text)
    assert len(blocks) == 1
    compile(blocks[0], "README.md", "exec")
    assert f"SentimentClassifier.from_pretrained({json.dumps(str(best))})" in blocks[0]
    assert 'clf(["A wonderful film."])' in blocks[0]


def test_model_card_example_runs(hub_run: tuple[Path, dict[str, Any]]) -> None:
    """The card's Python example, run as it stands, prints the prediction of the run's checkpoint."""
    run_dir, _ = hub_run
    (block,) = python_blocks(ModelCard.load(run_dir / "best" / "README.md").text)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, "README.md", "exec"), {})
    predictions = eval(output.getvalue().strip().splitlines()[-1])
    (expected,) = SentimentClassifier.from_pretrained(run_dir / "best", device="cpu")(["A wonderful film."])
    assert len(predictions) == 1 and predictions[0]["label"] == expected["label"]
    assert predictions[0]["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_model_card_mid_training_and_for_a_repo(hub_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Without metrics.json (a card written mid-training) the card has no results; an LSTM is tagged without
    bilstm; ``repo_id`` names the hub id in the example and the model-index."""
    run_dir, _ = hub_run
    run = tmp_path / "lstm-run"
    shutil.copytree(run_dir / "best", run / "best")
    (run / "best" / "README.md").unlink()
    (run / "best" / "curves.png").unlink()
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    config = json.loads((run / "best" / "config.json").read_text())
    (run / "best" / "config.json").write_text(json.dumps({**config, "bidirectional": False}))

    card = ModelCard.load(write_model_card(run / "best", run))
    assert "bilstm" not in card.data.tags and "lstm" in card.data.tags
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "## Training" in card.text and "| `hidden_dim` | `8` |" in card.text
    assert "## Results" not in card.text and "curves.png" not in card.text
    assert not (run / "best" / "curves.png").exists()
    assert "LSTM, 1 layer" in card.text and "BiLSTM" not in card.text

    shutil.copy(run_dir / "metrics.json", run / "metrics.json")
    shutil.copy(run_dir / "curves.png", run / "curves.png")
    card = ModelCard.load(write_model_card(run / "best", run, repo_id="someone/imdb-lstm"))
    assert card.data.model_name == "imdb-lstm" and card.data.eval_results
    (block,) = python_blocks(card.text)
    assert 'SentimentClassifier.from_pretrained("someone/imdb-lstm")' in block
    assert (run / "best" / "curves.png").is_file()

    card = ModelCard.load(write_model_card(run / "best", run, results=False))
    assert card.data.eval_results is None and "## Results" not in card.text


def test_model_card_describes_the_pooling_and_optimizer_of_the_run(
    hub_run: tuple[Path, dict[str, Any]], hub_imdb: Path, tmp_path: Path
) -> None:
    """The card's network and training lines follow the run's config: max pooling and AdamW (with its weight
    decay) are named as such; a run with the defaults reads its final hidden state and trains with Adam."""
    run_dir, _ = hub_run
    default = ModelCard.load(run_dir / "best" / "README.md").text
    assert "The final hidden state of both directions\ngoes through dropout" in default
    assert "(Adam, binary cross-entropy" in default and "| pooling | `last` |" in default

    run = tmp_path / "max-adamw"
    values = {
        "epochs": 1,
        "batch_size": 8,
        "hidden_dim": 8,
        "pooling": "max",
        "optimizer": "adamw",
        "weight_decay": 0.01,
    }
    train(tiny_config(hub_imdb, run, **values))
    text = ModelCard.load(write_model_card(run / "best", run)).text
    assert "The element-wise maximum of the top layer's outputs (both directions) over the review's words\ngoes" in text
    assert "(AdamW, weight decay 0.01, binary cross-entropy" in text and "| pooling | `max` |" in text
    assert "final hidden state" not in text and "(Adam," not in text


# ------------------------------------------------------------------------------------------------ the push


def test_push_then_load_back(
    hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, hf_home: Path
) -> None:
    """One commit holds every file, byte for byte; the model loads back through the Hub with identical logits; a
    later push with private=True is refused, the repo being public."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    repo_id = f"{USER}/imdb-bilstm"
    url = bounded(push_checkpoint, best, repo_id, token=TOKEN, commit_message="first push")

    assert sorted(fake_hub.repos) == [repo_id]
    repo = fake_hub.repos[repo_id]
    assert repo.private is False
    history = repo.history("main")
    assert [c.message for c in history] == ["first push", "initial commit"]
    pushed = history[0]
    assert url.endswith(pushed.oid)
    assert sorted(pushed.added) == sorted(PUSHED)
    for name in PUSHED:
        assert pushed.added[name] == (best / name).read_bytes(), name
    assert folder_hashes(best) == before
    requests = [(method, path) for method, path, _ in fake_hub.log]
    assert ("POST", "/api/repos/create") in requests
    assert ("POST", f"/api/models/{repo_id}/commit/main") in requests
    assert sum(path.startswith(f"/api/models/{repo_id}/commit/") for _, path in requests) == 1
    assert not any("/branch/" in path for _, path in requests)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    remote = bounded(LSTMClassifier.from_pretrained, repo_id).eval()
    local = LSTMClassifier.from_pretrained(best).eval()
    tokenizer = bounded(hf_hub_download, repo_id, "tokenizer.json")
    assert Path(tokenizer).read_bytes() == (best / "tokenizer.json").read_bytes()
    assert Path(tokenizer).is_relative_to(hf_home), "downloads must land in the temporary cache"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, local.embedding.num_embeddings, (4, 12), generator=generator)
    lengths = torch.tensor([12, 7, 3, 1])
    with torch.no_grad():
        assert torch.equal(remote(ids, lengths), local(ids, lengths))
    resolved = {path.rsplit("/", 1)[-1] for method, path, status in fake_hub.log if "/resolve/" in path}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= resolved

    # private=True only applies to a new repo: pushing it to this public one is refused, nothing committed.
    with pytest.raises(HubError, match="already exists and is public"):
        bounded(push_checkpoint, best, repo_id, private=True, token=TOKEN)
    assert len(repo.history("main")) == 2 and repo.private is False
    assert folder_hashes(best) == before
    assert not fake_hub.unhandled, fake_hub.unhandled


def test_push_private_to_a_branch(
    hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``private`` and ``revision`` are honoured: a private repo, the files on a new branch, main untouched; the
    token comes from HF_TOKEN; a second push to the branch adds one commit."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo_id = f"{USER}/imdb-private"
    bounded(push_checkpoint, best, repo_id, private=True, revision="v1")

    repo = fake_hub.repos[repo_id]
    assert repo.private is True
    assert [c.message for c in repo.history("main")] == ["initial commit"]
    branch = repo.history("v1")
    assert len(branch) == 2 and sorted(branch[0].added) == sorted(PUSHED)
    assert branch[0].tree[".gitattributes"]  # branched from main
    assert ("POST", f"/api/models/{repo_id}/branch/v1", 200) in fake_hub.log

    remote = bounded(LSTMClassifier.from_pretrained, repo_id, revision="v1").eval()
    local = LSTMClassifier.from_pretrained(best).eval()
    ids, lengths = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]]), torch.tensor([4, 2])
    with torch.no_grad():
        assert torch.equal(remote(ids, lengths), local(ids, lengths))
    with pytest.raises(Exception):  # noqa: B017 (the error class differs across huggingface_hub versions)
        bounded(hf_hub_download, repo_id, "config.json", revision="v1", token=False, force_download=True)
    assert any(status == 401 and "/resolve/v1/config.json" in path for _, path, status in fake_hub.log)

    bounded(push_checkpoint, best, repo_id, private=True, revision="v1", commit_message="again")
    assert [c.message for c in repo.history("v1")][:2] == ["again", "Upload sentiment-lstm checkpoint bilstm-tiny"]
    assert folder_hashes(best) == before
    assert not fake_hub.unhandled, fake_hub.unhandled


# ------------------------------------------------------------------------------------------------ push errors


def test_push_without_token(hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub) -> None:
    """No HF_TOKEN and no stored token: a HubError that says how to log in, before any request."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    with pytest.raises(HubError, match="login") as info:
        bounded(push_checkpoint, best, f"{USER}/x")
    assert "HF_TOKEN" in str(info.value)
    assert fake_hub.log == [] and fake_hub.repos == {}
    assert folder_hashes(best) == before


@pytest.mark.parametrize(
    ("token", "repo_id", "status", "expected"),
    [
        ("hf_not_a_valid_token", f"{USER}/x", 401, "did not accept the token"),
        (TOKEN, "someone-else/x", 403, "no write"),
    ],
)
def test_push_refused_token(
    hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, token: str, repo_id: str, status: int, expected: str
) -> None:
    """A token the Hub refuses (401) or one without write access to the namespace (403): a HubError that names
    the problem and says how to log in with a write token."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    with pytest.raises(HubError, match=expected) as info:
        bounded(push_checkpoint, best, repo_id, token=token)
    assert "huggingface-cli login" in str(info.value) and "HF_TOKEN" in str(info.value)
    assert ("POST", "/api/repos/create", status) in fake_hub.log
    assert fake_hub.repos == {}
    assert folder_hashes(best) == before


@pytest.mark.parametrize("how", ["environment", "at import"])
def test_push_offline(
    hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """HF_HUB_OFFLINE (set now, or when huggingface_hub was imported): a HubError before any request."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        set_hub_setting(monkeypatch, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        bounded(push_checkpoint, best, f"{USER}/x", token=TOKEN)
    assert fake_hub.log == []
    assert folder_hashes(best) == before


def test_push_unreachable(hub_run: tuple[Path, dict[str, Any]], hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at HF_ENDPOINT: a HubError that says to check the network and HF_ENDPOINT, quickly."""
    best = hub_run[0] / "best"
    before = folder_hashes(best)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    point_at(endpoint, monkeypatch)
    started = time.perf_counter()
    with pytest.raises(HubError, match="could not reach") as info:
        bounded(push_checkpoint, best, f"{USER}/x", token=TOKEN, timeout=30)
    assert endpoint in str(info.value) and "HF_ENDPOINT" in str(info.value)
    assert time.perf_counter() - started < 20
    assert folder_hashes(best) == before


def test_push_incomplete_checkpoint(hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, tmp_path: Path) -> None:
    """A folder without model.safetensors: an error naming it, before any request; the folder unchanged."""
    folder = tmp_path / "best"
    shutil.copytree(hub_run[0] / "best", folder)
    (folder / "model.safetensors").unlink()
    before = folder_hashes(folder)
    with pytest.raises(HubError, match=r"model\.safetensors missing"):
        bounded(push_checkpoint, folder, f"{USER}/x", token=TOKEN)
    assert fake_hub.log == []
    assert folder_hashes(folder) == before
    with pytest.raises(HubError, match="does not exist"):
        push_checkpoint(tmp_path / "nowhere", f"{USER}/x", token=TOKEN)


# ------------------------------------------------------------------------------------- trainer and command line


def test_training_with_push_to_hub_fails_before_training_without_a_token(
    hub_imdb: Path, hf_home: Path, tmp_path: Path
) -> None:
    """push_to_hub without a token stops at once: no run folder is made, no epoch is trained."""
    cfg = tiny_config(hub_imdb, tmp_path / "run", push_to_hub=True, hub_model_id=f"{USER}/never")
    with pytest.raises(HubError, match="no Hugging Face token"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_training_pushes_the_best_checkpoint_when_it_ends(
    hub_imdb: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """push_to_hub: true sends best/ (card naming the repo) in one commit once training ends."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo_id = f"{USER}/trained-and-pushed"
    cfg = tiny_config(hub_imdb, tmp_path / "run", epochs=1, push_to_hub=True, hub_model_id=repo_id, hub_private=True)
    bounded(train, cfg, timeout=120)
    repo = fake_hub.repos[repo_id]
    assert repo.private is True
    pushed = repo.history("main")[0]
    assert sorted(pushed.added) == sorted(PUSHED)
    best = tmp_path / "run" / "best"
    for name in PUSHED:
        assert pushed.added[name] == (best / name).read_bytes(), name
    assert repo_id.encode() in pushed.added["README.md"]  # the loading example names the repo


def test_push_command(hub_run: tuple[Path, dict[str, Any]], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`sentiment push RUN --repo_id ID --revision B --commit_message M` pushes RUN/best in one commit."""
    from sentiment.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo_id = f"{USER}/from-the-cli"
    args = ["push", str(hub_run[0]), "--repo_id", repo_id, "--revision", "v1", "--commit_message", "from the CLI"]
    assert bounded(main, args) == 0
    repo = fake_hub.repos[repo_id]
    commit = repo.history("v1")[0]
    assert commit.message == "from the CLI"
    assert sorted(commit.added) == sorted(PUSHED)
    assert commit.oid in capsys.readouterr().out
    assert bounded(main, ["push", str(hub_run[0])]) == 2  # no --repo_id: usage error
