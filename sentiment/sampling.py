"""Which reviews ``max_train_samples`` / ``max_eval_samples`` keep: one rule for raw data (:mod:`sentiment.data`)
and for prepared folders (:mod:`sentiment.prepare`), so both keep the same reviews for the same seed."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The schemes whose test split is IMDB's test file as it stands (in file order, not shuffled).
TEST_IN_FILE_ORDER = ("standard", "movie_blocks")


def sample_rows(
    sizes: Mapping[str, int],
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    test_in_file_order: bool = False,
) -> dict[str, np.ndarray]:
    """The rows that ``max_train_samples`` / ``max_eval_samples`` keep of the splits ``split_imdb`` made, in order.

    ``sizes`` gives the rows of each split (``train``, ``validation``, ``test``). Train and validation, already
    shuffled, keep their first N rows; so does test, unless ``test_in_file_order`` (it is IMDB's test file, sorted
    by label): then it keeps the first N of its ``seed``-shuffled order (``Dataset.shuffle(seed=seed)``'s
    permutation). Splits without a cap are left out of the result. ``split_imdb`` and a prepared folder
    (``PreparedData.resolve``) both cut through this, so both keep the same reviews for the same seed; it needs
    no ``datasets``, so that training from a prepared folder does not either.
    """
    kept: dict[str, np.ndarray] = {}
    if max_train_samples is not None:
        kept["train"] = np.arange(min(max_train_samples, sizes["train"]))
    if max_eval_samples is not None:
        for split in ("validation", "test"):
            if split == "test" and test_in_file_order:
                order = np.random.default_rng(seed).permutation(sizes[split])
            else:
                order = np.arange(sizes[split])
            kept[split] = order[:max_eval_samples]
    return kept
