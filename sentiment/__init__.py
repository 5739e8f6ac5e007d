"""LSTM and BiLSTM sentiment classifiers for IMDB on the Hugging Face stack."""

from sentiment.config import TrainConfig, build_config
from sentiment.model import LSTMClassifier

__all__ = ["LSTMClassifier", "TrainConfig", "build_config"]
__version__ = "0.1.0"
