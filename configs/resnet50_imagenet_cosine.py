"""ResNet-50 on ImageNet, the Flax example's recipe: 5 warm-up epochs, then cosine.

SGD with Nesterov momentum 0.9, 0.1 per 256 images scaled linearly, weight decay 1e-4,
100 epochs. The Flax example reports 76.72% top-1 (8 x V100, batch 512, float32).
"""

from configs import resnet50_imagenet


def get_config():
  config = resnet50_imagenet.get_config()
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.final_learning_rate_fraction = 0.0
  config.num_epochs = 100
  config.nesterov = True
  return config
