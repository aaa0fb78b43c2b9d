"""Reference models built from hetrain.nn, written for one device, and the LightningModules training them."""

from hetrain.models.bert import BertClassifier
from hetrain.models.resnet import ResNet
from hetrain.models.task import ClassificationTask

__all__ = ["BertClassifier", "ClassificationTask", "ResNet"]
