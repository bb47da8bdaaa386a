"""Every config field, declared once with its default and what it means: the default job
(ResNet-20 on scikit-learn's embedded digits, offline, in minutes).

``configs/default.py`` is this config; the experiment configs import it and change a few
fields, so any of them accepts any ``--config.FIELD=VALUE`` override. The package reads
fields as attributes, never with a fallback; ``jax_resnet.configuration.validation`` checks them all
before any data is read.
Durations: ``*_epochs`` fields may be fractional; ``*_steps`` fields count optimizer
steps. Off, or not set, is written one way, the field type's zero: 0, '' or ().
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model.
  config.model = 'resnet20'  # a name from jax_resnet.models.MODEL_NAMES
  config.model_options = ml_collections.ConfigDict(
    {
      # 'imagenet' (7x7/2 conv + max-pool), 'cifar' (one 3x3 conv) or 'deep'; '': the
      # model's own.
      'stem': '',
      'kernel_init': 'he_normal',  # he_normal, he_uniform or lecun_normal
    }
  )
  config.half_precision = False  # half-precision compute; params, BN statistics, loss fp32
  config.half_precision_dtype = 'bfloat16'  # or 'float16' (dynamic loss scaling), pre-Ampere
  config.dropout_rate = 0.0  # before the classifier head
  config.bn_momentum = 0.9  # BatchNorm running-statistics decay (torch momentum 0.1)
  config.bn_epsilon = 1e-5  # BatchNorm's variance epsilon (torchvision's 1e-5)
  config.zero_init_residual = True  # each block's last BN scale starts at 0 (Goyal et al.)
  config.remat = False  # recompute block activations in the backward pass: less memory
  config.stochastic_depth_rate = 0.0  # drop rate of the last block's branch (linear in depth)
  config.block_dropout_rate = 0.0  # dropout between a basic block's convolutions (WRN)

  # Weights in and fine-tuning (see jax_resnet/training/warm_start.py).
  config.init_from = ''  # WORKDIR[:latest|:STEP], an export, or torchvision .safetensors
  config.freeze = ''  # '', 'backbone' (all but the head) or stages: 'stem,stage1,stage2'
  config.head_learning_rate_multiplier = 1.0  # the head's rate = this x the schedule's
  config.frozen_batchnorm = False  # BN uses running statistics in training too (small batches)
  # BatchNorm statistics of the global batch (synchronised across devices); False: each
  # device's own share (torchvision's and timm's default, no cross-device reductions).
  config.bn_sync = True

  # Data: source.
  config.dataset = 'digits'  # 'digits' (embedded), 'folder' or a tensorflow-datasets name
  config.data_dir = ''  # tfds data_dir; empty: tfds's default
  config.train_split = 'train'  # tfds split names
  config.eval_split = 'test'  # digits: the fixed 20% held out
  config.train_dir = ''  # dataset='folder': <train_dir>/<class>/*.jpg|png
  config.eval_dir = ''  # dataset='folder': same classes (or a subset) as train_dir
  config.verify_images = True  # folder: drop (and name) undecodable files at start
  config.digits_classes = ''  # digits: keep these classes, e.g. '01234' (labels renumbered)
  config.image_size = 16  # side of the square images the model sees (digits: 8x8 upsampled)

  # Data: input performance (safe to change when resuming).
  config.cache = True  # keep the (encoded or small decoded) data set in host memory
  config.data_on_device = False  # digits/CIFAR: whole uint8 set on the device, crop there
  config.shuffle_buffer = 50_000  # examples; clipped to the training-set size
  config.deterministic_input = True  # tf.data keeps order: bit-exact resume on CPU
  # tf.data's threads per process; 0: this process's cores divided by the processes on its
  # host (one process per GPU must not each autotune over every core).
  config.input_threads = 0

  # Data: train augmentation on the host ('pad' for fixed-size sets, 'random_resized').
  config.train_crop = 'auto'  # 'auto': random_resized for variable-size images, else pad
  config.random_crop_pad = 2  # pad: zero-pad by this many pixels, crop back at random
  config.random_flip = False  # horizontal flip with probability 1/2 (never for digits)
  config.crop_scale = (0.08, 1.0)  # random_resized: area fraction range
  config.crop_ratio = (3 / 4, 4 / 3)  # random_resized: aspect-ratio range
  config.crop_attempts = 10  # random_resized: tries before the centre-crop fallback
  config.eval_crop_fraction = 0.875  # random_resized eval: centre crop of the shorter side
  config.resize_antialias = False  # random_resized: antialiased resize (2x the cost)
  config.color_jitter_prob = 0.8  # random_resized: chance the colour jitter is applied
  config.color_jitter_brightness = 0.0  # jitter strengths; 0 is off (all off by default)
  config.color_jitter_contrast = 0.0
  config.color_jitter_saturation = 0.0
  config.color_jitter_hue = 0.0
  config.inception_color = False  # random_resized: Inception-style colour distortion

  # Data: train augmentation on the device, inside the train step (all off by default).
  config.cutout_size = 0  # side of one zeroed square per image; 0 is off
  config.randaugment_layers = 0  # RandAugment: ops per image (torchvision's op set); 0 off
  config.randaugment_magnitude = 9.0  # a bin of randaugment_bins (torchvision: 9 of 31)
  config.randaugment_magnitude_std = 0.0  # timm's per-op magnitude noise (mstd)
  config.randaugment_bins = 31  # 31: torchvision's scale; 11: timm's (m out of 10)
  config.trivial_augment = False  # TrivialAugment-Wide instead (one op, any strength)
  config.autoaugment_policy = ''  # AutoAugment instead: 'imagenet', 'cifar10' or 'svhn'
  config.random_erasing_prob = 0.0  # timm's random erasing (noise rectangle), per image
  config.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha); 0 off
  config.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha); 0 off
  config.mix_prob = 1.0  # chance a batch is mixed at all
  config.mix_switch_prob = 0.5  # with both on: chance of CutMix rather than Mixup

  # Optimizer.
  config.batch_size = 128  # global, over all devices of all hosts
  config.eval_batch_size = 256  # global; safe to change when resuming
  config.optimizer = 'sgd'  # sgd, adam, adamw, lars or lamb
  config.learning_rate = 0.4  # the peak
  config.scale_learning_rate = False  # multiply by batch_size / base_batch_size
  config.base_batch_size = 256  # the batch size learning_rate is given for
  config.momentum = 0.9  # sgd
  config.nesterov = True  # sgd
  config.adam_b1 = 0.9  # adam, adamw, lamb
  config.adam_b2 = 0.999  # adam, adamw, lamb
  config.weight_decay = 5e-4  # coupled L2 for sgd and adam, decoupled for adamw
  config.weight_decay_kernels_only = True  # no decay on BN scales/biases nor the head bias
  config.label_smoothing = 0.0  # weight moved from the true class to all classes evenly
  config.lars_trust_coefficient = 0.001  # lars: the layer-wise trust ratio's coefficient
  config.sam_rho = 0.0  # sharpness-aware minimisation's neighbourhood radius; 0 off
  # Gradient clipping before the optimizer (timm's --clip-grad): to this global norm, and
  # unit-wise to agc_clip times each unit's weight norm (AGC, timm's --clip-mode agc: 0.01
  # usual), the head excepted. 0: off.
  config.grad_clip_norm = 0.0
  config.agc_clip = 0.0
  # Micro-batches per optimizer step (gradient accumulation): batch_size stays the global
  # batch of one step, computed as k micro-batches of batch_size / k inside the jitted
  # step; BatchNorm normalises each micro-batch by its own statistics. Safe to change on
  # resume.
  config.grad_accum_steps = 1
  config.loss = 'softmax'  # softmax cross-entropy, or 'bce' (binary, timm's RSB recipes)
  config.ema_decay = 0.0  # weight EMA, evaluated beside the raw weights; 0 off (0.9999 usual)
  config.ema_warmup = True  # decay min(ema_decay, (1+t)/(10+t)) (TF's rule); False: constant

  # Knowledge distillation: the teacher runs in inference mode inside the train step.
  config.distill_from = ''  # the teacher: a WORKDIR[:latest|:STEP] or an export; '' off
  config.distill_weight = 0.5  # loss = (1 - w) * hard-label loss + w * distillation loss
  config.distill_temperature = 4.0  # softens both distributions; the loss is scaled by T^2

  # Resolution.
  # Progressive resizing (FFCV): train at sizes growing linearly from the first to the
  # second, over the epochs (start, end; (): the whole run); the data is made at image_size.
  config.progressive_resizing_sizes = ()  # (start_size, end_size), e.g. (160, 192); () off
  config.progressive_resizing_epochs = ()  # (start_epoch, end_epoch); (): every epoch
  config.progressive_resizing_multiple = 32  # sizes in between are rounded to this
  config.eval_image_size = 0  # evaluate at this size (train low, test high); 0: image_size
  config.eval_flip = False  # average the logits with the mirrored images' at eval

  # Learning-rate schedule.
  config.schedule = 'onecycle'  # onecycle, cosine, multistep, constant or plateau
  config.warmup_epochs = 0.0  # linear warm-up: cosine, multistep, constant, plateau
  config.onecycle_pct_start = 0.25  # onecycle: fraction of training spent warming up
  config.onecycle_div_factor = 25.0  # onecycle: initial rate = peak / this
  config.onecycle_final_div_factor = 1e4  # onecycle: final rate = initial / this
  config.final_learning_rate_fraction = 0.0  # cosine: end value / peak
  config.decay_at = (0.5, 0.75)  # multistep: fractions of training
  config.decay_factor = 0.1  # multistep: rate multiplier at each of decay_at
  config.plateau_factor = 0.1  # plateau: rate multiplier after a plateau
  config.plateau_patience = 10  # plateau: epochs without improvement before a cut
  config.plateau_rtol = 1e-4  # plateau: relative improvement that counts
  config.plateau_cooldown = 0  # plateau: epochs after a cut before counting again
  config.plateau_min_scale = 0.0  # plateau: the rate never goes below this times the peak

  # Duration and periodic actions.
  config.num_epochs = 20  # passes over the training set
  config.num_train_steps = 0  # overrides num_epochs when set (tests, benchmarks); 0 off
  config.steps_per_dispatch = 1  # train steps per jitted call; > 1 for small models
  config.log_every_steps = 20  # train metrics, progress and the divergence check
  config.eval_every_epochs = 5.0  # 0: evaluate at the end only
  config.checkpoint_every_epochs = 1.0  # 0: only at the end (and checkpoint_every_steps)
  config.checkpoint_every_steps = 0  # 0: off (checkpoint_every_epochs still applies)
  config.keep_checkpoints = 3  # newest checkpoints kept in WORKDIR/checkpoints
  config.seed = 0  # initialisation, shuffling and every augmentation

  # Diagnostics: a device trace of a few steps in WORKDIR/profile (TensorBoard's profile
  # plugin) and a table of the top operations in the log and WORKDIR/profile/top_ops.txt.
  config.profile_steps = 0  # steps to trace; 0 off
  config.profile_first_step = 10  # the first traced step (after compilation and warm-up)

  # Experiment trackers beside TensorBoard and metrics.jsonl (observe/trackers.py), each an
  # optional extra; '' off. Weights & Biases honours WANDB_MODE (offline: synced later).
  config.wandb_project = ''  # pip install 'jax_resnet[wandb]'
  config.wandb_entity = ''  # '': W&B's default entity
  config.wandb_run_name = ''  # '': W&B's generated name
  config.mlflow_tracking_uri = ''  # e.g. http://host:5000 or file:///path (pip: [mlflow])
  config.mlflow_experiment = 'jax_resnet'
  return config


def merged_with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A config written (as JSON) by this or an older version, with the fields it lacks at
  their defaults; fields this version no longer has are dropped, renamed ones carried
  over (``migrated``)."""
  return _merge(get_config(), migrated(saved))


def migrated(saved: dict) -> dict:
  """A saved config (JSON) in today's field names and values: what older versions wrote
  as ``progressive_resizing`` (sizes and epochs in one tuple), a ``num_train_steps`` of
  -1 or a ``model_options.stem`` of None (both meaning off) is written as now."""
  saved = dict(saved)
  if 'progressive_resizing' in saved:
    old = list(saved.pop('progressive_resizing') or ())  # JSON: a list
    saved['progressive_resizing_sizes'] = old[:2]
    saved['progressive_resizing_epochs'] = old[2:]
  if isinstance(saved.get('num_train_steps'), int) and saved['num_train_steps'] < 0:
    saved['num_train_steps'] = 0
  options = saved.get('model_options')
  if isinstance(options, dict) and 'stem' in options and options['stem'] is None:
    saved['model_options'] = {**options, 'stem': ''}
  return saved


def _merge(config: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  for key, value in saved.items():
    if key not in config:
      continue
    if isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value or {})
    elif isinstance(config[key], tuple) and isinstance(value, list):
      config[key] = tuple(value)
    elif isinstance(config[key], float) and isinstance(value, int):
      config[key] = float(value)
    else:
      config[key] = value
  return config
