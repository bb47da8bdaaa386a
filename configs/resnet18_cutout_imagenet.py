"""ResNet-18 + Cutout on ImageNet: a 112x112 hole, half the side as 16 is of CIFAR's 32."""

from configs import resnet18_imagenet


def get_config():
  config = resnet18_imagenet.get_config()
  config.cutout_size = 112
  return config
