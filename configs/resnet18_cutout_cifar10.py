"""ResNet-18 + Cutout 16 on CIFAR-10, DeVries & Taylor 2017 (96.01%, error 3.99%).

The CIFAR variant of ResNet-18 (3x3 stem, no max-pool) trained by the Wide ResNet recipe
(`wrn28_10_cifar10`: SGD 0.1 with Nesterov momentum 0.9, weight decay 5e-4, batch 128,
200 epochs, the rate divided by 5 at epochs 60, 120 and 160); crop, flip and a 16x16
Cutout hole.
"""

from configs import wrn28_10_cifar10


def get_config():
  config = wrn28_10_cifar10.get_config()
  config.model = 'resnet18'
  config.model_options.stem = 'cifar'
  config.cutout_size = 16
  return config
