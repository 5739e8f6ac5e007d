"""Train an LSTM/BiLSTM on IMDB; the same trainer as ``sentiment train``, for ``accelerate launch`` and
``wandb agent``::

    accelerate launch scripts/train.py --config configs/bilstm.yaml --dataset ../shared/data/imdb --hidden_dim=150

``--help`` lists the options (the config keys) in groups, each with its meaning and default.
"""

import sys

from sentiment.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog=sys.argv[0]))
