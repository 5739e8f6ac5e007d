"""Tracking a run: wandb (online, or offline when not logged in) and the loss/accuracy curves."""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from sentiment.config import ConfigError, TrainConfig
from sentiment.files import atomic_path

logger = logging.getLogger(__name__)


def setup_wandb(cfg: TrainConfig, output_dir: Path, run_id: str | None) -> dict[str, Any]:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "report_to: wandb needs the wandb package (pip install wandb); or pass --report_to=none"
        ) from None
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: not logged in, writing an offline run (upload it later with `wandb sync`)")
    kwargs: dict[str, Any] = {"dir": str(output_dir)}
    if "WANDB_SWEEP_ID" not in os.environ:
        kwargs["name"] = cfg.run_name or output_dir.name
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return kwargs


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def plot_curves(
    history: list[dict[str, float]],
    path: Path,
    panels: tuple[tuple[str, str], ...] = (("loss", "Loss (BCE)"), ("acc", "Accuracy")),
) -> None:
    """Per epoch, train against validation, one panel per ``(metric, title)`` (``train_<metric>`` and
    ``valid_<metric>`` of each record; loss and accuracy by default), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"valid_{metric}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def start_wandb(
    accelerator: Accelerator, cfg: TrainConfig, config: dict[str, Any], output_dir: Path, state: dict[str, Any]
) -> None:
    """Start the wandb tracker of a run: its id kept in ``state`` (saved with the run, so ``--resume`` continues the
    same wandb run; ``WANDB_RUN_ID``, which ``wandb agent`` sets, first), ``config`` as the run's config."""
    if accelerator.is_main_process and state["wandb_run_id"] is None:
        alphabet = string.ascii_lowercase + string.digits
        state["wandb_run_id"] = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(alphabet) for _ in range(8))
    init_kwargs = setup_wandb(cfg, output_dir, state["wandb_run_id"]) if accelerator.is_main_process else {}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init_kwargs})
