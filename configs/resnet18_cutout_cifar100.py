"""ResNet-18 + Cutout 8 on CIFAR-100, DeVries & Taylor 2017 (78.04%, error 21.96%)."""

from configs import resnet18_cutout_cifar10


def get_config():
  config = resnet18_cutout_cifar10.get_config()
  config.dataset = 'cifar100'
  config.cutout_size = 8
  return config
