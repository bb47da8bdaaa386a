"""ResNet-18 + Cutout on CIFAR-10 (DeVries & Taylor's recipe) with sharpness-aware
minimisation (Foret et al. 2021; rho 0.05): two forward-backward passes per step."""

from configs import resnet18_cutout_cifar10


def get_config():
  config = resnet18_cutout_cifar10.get_config()
  config.sam_rho = 0.05
  return config
