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
from roost.models.resnet import ResNet, ResNetConfig
from roost.models.text_classifier import TextClassifier, TextClassifierConfig
from roost.models.vgg import VGG5Config, VGG11Config, vgg5, vgg11
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
MODELS.register(
    "vgg5",
    VGG5Config,
    "PipeLearn/FedAdapt VGG5 for split learning: conv3x3 32, 64, 64 (+BN), 2 pools, "
    "linear 128 and out",
)(
    lambda cfg, info: vgg5(cfg, info)  # type: ignore[arg-type]
)
MODELS.register(
    "vgg11",
    VGG11Config,
    "VGG11 with BatchNorm for split learning: 8 conv3x3 (+BN), 5 pools, linear 4096, 4096 "
    "and out (needs images >= 17x17)",
)(
    lambda cfg, info: vgg11(cfg, info)  # type: ignore[arg-type]
)
MODELS.register(
    "resnet",
    ResNetConfig,
    "CIFAR ResNet (He et al. 2016) for split learning: 16/32/64-channel stages, depth 6n+2 "
    "(8 is ResNet-8), BatchNorm",
)(
    lambda cfg, info: ResNet(cfg, info)  # type: ignore[arg-type]
)


def build_model(name: str, config: object, info: DatasetInfo) -> nn.Module:
    return MODELS.get(name).factory(config, info)
