"""Small reference models, registered by name for ``model=NAME``.

A builder takes its config and the dataset's :class:`~roost.data.base.DatasetInfo` and
returns an ``nn.Module`` producing logits. Builders draw their initial weights from torch's
global generator: the engine calls ``torch.manual_seed(seed)`` right before building, as
W1 prescribes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from roost.data.base import DatasetInfo
from roost.models.char_lstm import CharLSTM, CharLSTMConfig
from roost.models.cnn import CNN, CNNConfig
from roost.models.mlp import MLP, MLPConfig
from roost.models.text_classifier import TextClassifier, TextClassifierConfig
from roost.registry import Registry

__all__ = ["MODELS", "build_model"]

ModelBuilder = Callable[[object, DatasetInfo], nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")
MODELS.register("mlp", MLPConfig, "fully connected ReLU net (FedAvg paper's 2NN by default)")(
    lambda cfg, info: MLP(cfg, info)  # type: ignore[arg-type]
)
MODELS.register("cnn", CNNConfig, "two conv5x5+pool layers and two linear (FedAvg paper's CNN)")(
    lambda cfg, info: CNN(cfg, info)  # type: ignore[arg-type]
)
MODELS.register("char_lstm", CharLSTMConfig, "character LSTM for next-character prediction")(
    lambda cfg, info: CharLSTM(cfg, info)  # type: ignore[arg-type]
)
MODELS.register(
    "text_classifier",
    TextClassifierConfig,
    "mean of token embeddings and a linear layer, for word ids (data.features=token_ids)",
)(
    lambda cfg, info: TextClassifier(cfg, info)  # type: ignore[arg-type]
)


def build_model(name: str, config: object, info: DatasetInfo) -> nn.Module:
    return MODELS.get(name).factory(config, info)
