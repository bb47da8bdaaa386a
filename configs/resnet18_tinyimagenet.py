"""ResNet-18 (CIFAR stem: 3x3, no max-pool) on Tiny ImageNet (200 classes, 64x64 images).

The data set's own layout is read as a folder data set: ``train/<wnid>/images/*.JPEG``,
and ``val/images/`` labelled by ``val/val_annotations.txt``. Download and unpack
tiny-imagenet-200.zip, then point train_dir and eval_dir at it. SGD 0.1 with Nesterov
momentum, weight decay 5e-4, 100 epochs, OneCycle; RandomResizedCrop (scale 0.35-1) and
flip at 64 px.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet18'
  config.model_options.stem = 'cifar'
  config.dataset = 'folder'
  config.train_dir = 'tiny-imagenet-200/train'
  config.eval_dir = 'tiny-imagenet-200/val'
  config.image_size = 64
  config.random_crop_pad = 0
  config.random_flip = True
  config.crop_scale = (0.35, 1.0)
  config.eval_crop_fraction = 1.0  # the 64x64 images whole
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_epochs = 100
  config.learning_rate = 0.1
  config.nesterov = True
  config.weight_decay = 5e-4
  config.log_every_steps = 100
  config.eval_every_epochs = 2.0
  return config
