"""ResNet-18 on ImageNet: the ResNet-50 recipe (resnet50_imagenet) with 18 layers.

With plain18_imagenet and resnet18_cutout_imagenet: the plain-vs-residual-vs-Cutout
comparison. He et al. 2015 Table 2 (10-crop): ResNet-18 72.12%, plain-18 72.06%.
"""

from configs import resnet50_imagenet


def get_config():
  config = resnet50_imagenet.get_config()
  config.model = 'resnet18'
  return config
