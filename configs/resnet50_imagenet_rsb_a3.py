"""ResNet-50 on ImageNet with timm's "ResNet strikes back" A3 recipe (Wightman et al. 2021):
78.1% top-1 at 224 px after 100 epochs at 160 px.

LAMB, rate 8e-3 at batch 2048, weight decay 0.02, 5 warm-up epochs then cosine; binary
cross-entropy; Mixup 0.1 and CutMix 1.0; RandAugment rand-m6-mstd0.5 (timm's scale:
magnitude 6 of 10, noise 0.5); stochastic depth 0.05; train at 160, test at 224 with a
0.95 centre crop; bf16. Not reproduced: timm's BCE target threshold (0.2) and its
RandAugment variant's ops applied with probability 1/2 (here always, as torchvision).
"""

from configs import resnet50_imagenet


def get_config():
  config = resnet50_imagenet.get_config()
  config.image_size = 160
  config.eval_image_size = 224
  config.eval_crop_fraction = 0.95
  config.batch_size = 2048
  config.num_epochs = 100
  config.optimizer = 'lamb'
  config.learning_rate = 8e-3
  config.scale_learning_rate = False
  config.weight_decay = 0.02
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.loss = 'bce'
  config.mixup_alpha = 0.1
  config.cutmix_alpha = 1.0
  config.randaugment_layers = 2
  config.randaugment_magnitude = 6.0
  config.randaugment_magnitude_std = 0.5
  config.randaugment_bins = 11
  config.stochastic_depth_rate = 0.05
  return config
