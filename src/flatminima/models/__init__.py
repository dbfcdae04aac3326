"""Models used in the experiments: CIFAR ResNets, a small CNN for 8x8 digits and an MLP."""

from flatminima.models.mlp import MLP
from flatminima.models.resnet_cifar import BasicBlock, CifarResNet, cifar_resnet, resnet20, resnet32, resnet56
from flatminima.models.small_cnn import SmallCNN

__all__ = ["MLP", "BasicBlock", "CifarResNet", "SmallCNN", "cifar_resnet", "resnet20", "resnet32", "resnet56"]
