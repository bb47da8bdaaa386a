"""Plain-18 (ResNet-18 without shortcuts) on ImageNet, otherwise as resnet18_imagenet."""

from configs import resnet18_imagenet


def get_config():
  config = resnet18_imagenet.get_config()
  config.model = 'plain18'
  return config
