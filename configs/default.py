"""The default job: ResNet-20 on scikit-learn's embedded digits, offline, in minutes.

Every other config imports this one and changes a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model.
  config.model = 'resnet20'
  config.model_options = ml_collections.ConfigDict()  # extra create_model options, e.g. stem
  config.half_precision = False  # bf16 compute, fp32 params, BN statistics and loss
  config.half_precision_dtype = 'bfloat16'  # 'float16' (dynamic loss scaling): pre-Ampere GPUs
  config.dropout_rate = 0.0
  config.bn_momentum = 0.9
  config.bn_epsilon = 1e-5
  config.zero_init_residual = True
  config.remat = False  # recompute block activations in the backward pass: less memory

  # Data.
  config.dataset = 'digits'  # 'digits' (embedded) or any tensorflow-datasets name
  config.data_dir = ''  # tfds data_dir; empty for tfds's default
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 16  # digits are 8x8, upsampled
  config.random_crop_pad = 2  # pad-and-random-crop on the host
  config.random_flip = False  # never for digits
  config.cutout_size = 0  # on the device; 0 is off
  config.shuffle_buffer = 50_000
  config.deterministic_input = True
  config.train_dir = ''  # dataset='folder': <train_dir>/<class>/*.jpg|png
  config.eval_dir = ''  # dataset='folder': same classes (or a subset) as train_dir
  config.verify_images = True  # folder: drop (and name) undecodable files at start
  config.cache = True  # keep the (encoded or small decoded) data set in host memory
  config.data_on_device = False  # digits/CIFAR: whole uint8 set on device, crop there
  # 'auto': 'random_resized' (ImageNet-style) for variable-size images, else 'pad'.
  config.train_crop = 'auto'
  config.crop_scale = (0.08, 1.0)  # random_resized: area fraction range
  config.crop_ratio = (3 / 4, 4 / 3)  # random_resized: aspect-ratio range
  config.crop_attempts = 10  # random_resized: tries before the centre-crop fallback
  config.eval_crop_fraction = 0.875  # random_resized eval: centre crop of shorter side
  config.resize_antialias = False  # random_resized: antialiased resize (2x the cost)
  config.color_jitter_prob = 0.8  # random_resized: chance jitter is applied
  config.color_jitter_brightness = 0.0  # strengths; 0 is off (all off by default)
  config.color_jitter_contrast = 0.0
  config.color_jitter_saturation = 0.0
  config.color_jitter_hue = 0.0
  config.inception_color = False  # random_resized: Inception-style colour distortion

  # Optimisation.
  config.batch_size = 128  # global, over all devices of all hosts
  config.eval_batch_size = 256
  config.num_epochs = 20
  config.num_train_steps = -1  # > 0 overrides num_epochs (tests, benchmarks)
  config.optimizer = 'sgd'
  config.learning_rate = 0.4  # the peak
  config.scale_learning_rate = False  # multiply by batch_size / base_batch_size
  config.base_batch_size = 256
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.weight_decay_kernels_only = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.label_smoothing = 0.0
  config.schedule = 'onecycle'
  config.onecycle_pct_start = 0.25
  config.onecycle_div_factor = 25.0
  config.onecycle_final_div_factor = 1e4
  config.warmup_epochs = 0.0  # cosine, multistep and constant schedules
  config.final_learning_rate_fraction = 0.0  # cosine end value / peak
  config.decay_at = (0.5, 0.75)  # multistep: fractions of training
  config.decay_factor = 0.1
  config.steps_per_dispatch = 1  # train steps per jitted call (lax.scan); >1 for small models

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 20
  config.eval_every_epochs = 5.0
  config.keep_checkpoints = 3
  config.checkpoint_every_steps = 0  # 0: at each epoch end only
  return config
