"""The persistent LSTM kernels' two benchmark switches, shared by the suite and the step profile: which weights'
formats the plan may take (:data:`sentiment.persistent.WEIGHT_FORMATS`) and whether a unidirectional stack runs in
one launch (:data:`sentiment.persistent.STACK_LAYERS`)."""

from __future__ import annotations

import argparse

from sentiment import persistent


def add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--persistent_weights`` and ``--persistent_stack`` to ``parser``."""
    parser.add_argument(
        "--persistent_weights",
        help="formats the persistent kernels' plan may take, in order (sentiment.persistent.WEIGHT_FORMATS), e.g. "
        "fp32,mma for the tensor cores; the train rows' path names them",
    )
    parser.add_argument(
        "--persistent_stack",
        choices=("on", "off"),
        help="run a unidirectional model's layers in one launch of the stacked persistent kernels, or a launch per "
        "layer (sentiment.persistent.STACK_LAYERS) where rnn_input is persistent; the train rows' path says so",
    )


def apply_kernel_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Set the kernels' module switches from parsed ``args``; return the label that results' paths carry ("" when
    neither flag is given). A format that does not exist is a parser error naming the choices."""
    label = ""
    if args.persistent_stack:
        persistent.STACK_LAYERS = args.persistent_stack == "on"
        label = " (layers stacked)" if persistent.STACK_LAYERS else " (a launch per layer)"
    if args.persistent_weights:
        formats = tuple(args.persistent_weights.split(","))
        if set(formats) - set(persistent.FORMATS):
            choices = ", ".join(persistent.FORMATS)
            parser.error(f"--persistent_weights {args.persistent_weights}: choose from {choices}")
        persistent.WEIGHT_FORMATS = formats
        label += f" (persistent weights {args.persistent_weights})"
    return label
