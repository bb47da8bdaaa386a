"""ResNet-50 on ImageNet: SGD momentum 0.9, weight decay 1e-4, OneCycle, bf16."""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet50'
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  config.image_size = 224
  config.random_crop_pad = 0
  config.random_flip = True
  config.half_precision = True
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 40
  config.learning_rate = 0.1  # per 256 images, scaled linearly
  config.scale_learning_rate = True
  config.nesterov = False
  config.weight_decay = 1e-4
  config.onecycle_pct_start = 0.15
  config.shuffle_buffer = 16 * 1024
  config.cache = False  # ~140 GB of JPEGs: stream them
  config.train_crop = 'random_resized'
  config.crop_scale = (0.08, 1.0)
  config.crop_ratio = (3 / 4, 4 / 3)
  config.eval_crop_fraction = 0.875  # resize shorter side to 256, centre crop 224
  config.deterministic_input = False
  config.log_every_steps = 100
  config.eval_every_epochs = 1.0
  return config
