r"""The paper's model on the generated three-modality set (`synthetic_mm`).

Train and evaluate (what `make demo` runs; 6 to 16 minutes on 2 CPU cores, by the machine):

  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo

Evaluate the latest checkpoint again:

  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo --mode=evaluate

Presets through `get_config(arg)` (`--config configs/synthetic.py:NAME`):
  demo   (default) ResNet-18 of width 16 at 96 x 48 on `synthetic_mm/demo`, sized for a CPU.
  tiny   a few steps of a width-8 network on `synthetic_mm/tiny`: the tests' configuration.
  paper  the paper's scale: ResNet-50 (width 64) at 288 x 144, D = 512, P x K = 8 x 4; a GPU
         configuration (the tests run one step of it).

Expected result of the demo preset (seed 0, measured 2026-12-03 on a 2-core CPU, README): ir->rgb
Rank-1 0.63 and mAP 0.65, rgb->ir Rank-1 0.68 and mAP 0.66, all six directions at Rank-1 0.59 to
0.76, fused/all mAP 0.96, with the raw-pixel baseline at ir->rgb Rank-1 0.06; seeds differ by up
to 20 Rank-1 points.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("demo", "tiny" or "paper")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"
  # Appended to the XLA_FLAGS environment variable by `mmreid_jax.main` and scripts/benchmark.py
  # before JAX starts (e.g. "--xla_cpu_enable_concurrency_optimized_scheduler=false", which
  # configs/benchmark.py sets: ResNet-50's step 10-13% faster on 2 CPU cores).
  config.xla_flags = ""
  # Set in the GLIBC_TUNABLES environment variable by `mmreid_jax.main` and scripts/benchmark.py,
  # which restart themselves once to apply them (glibc reads them at start-up); configs/benchmark.py
  # keeps freed host memory for reuse on huge pages (docs/performance.md).
  config.glibc_tunables = ""

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_mm/demo"
  config.data.data_dir = config_dict.placeholder(str)
  config.data.height = 96
  config.data.width = 48
  config.data.num_identities = 8  # P
  config.data.tuples_per_identity = 4  # K
  config.data.single_modality_frac = 0.5
  # Scene conditions of the synthetic set's captures ({name: probability}, summing to 1; names in
  # synthetic_render.CONDITIONS) for the train split, and for query and gallery (None: the
  # dataset config's own mix, clear scenes for tiny, demo and hard).
  config.data.conditions = None
  config.data.test_conditions = None
  config.data.prefetch = 2
  config.data.num_threads = 0  # 0: tf.data's default pool

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True
  config.augment.pad = 4
  config.augment.erasing_prob = 0.5
  config.augment.erasing_area = (0.02, 0.4)
  config.augment.erasing_aspect = (0.3, 3.33)
  config.augment.channel_prob = 0.3

  config.model = ml_collections.ConfigDict()
  config.model.name = "joint_attention"
  config.model.depth = 18
  config.model.width = 16
  config.model.last_stride = 1
  config.model.specific_stages = 0
  config.model.embed_dim = 128
  config.model.num_stripes = 6
  config.model.part_dim = 32
  config.model.attention_reduction = 16
  config.model.attention_dim = 32
  config.model.discriminator_hidden = 256
  # Embed every multi-modal training tuple both fused and with each modality alone, from one
  # backbone pass (models.reid.MultimodalReID.train_alone_views).
  config.model.train_alone_views = False
  # With alone views: stop the fused view's gradient at the backbone's maps.
  config.model.fused_view_detached = False
  # How the modal attention weighs the modalities: "paper" (the paper's formula) or
  # "reliability" (each modality's confidence from its own features; models/attention.py).
  config.model.modal_weighting = "paper"
  # The backbone's convolutions: "xla" (XLA's own: cuDNN on a GPU), "cpu" (models/cpu_forms.py:
  # the same parameters and, up to rounding, results; faster on a CPU backend) or "auto" ("cpu"
  # on a CPU backend, else "xla"). The demo's recorded results were trained with "xla".
  config.model.kernels = "xla"
  # A torchvision ResNet (.pth or .safetensors; README "Pretrained weights") for the backbone.
  config.model.pretrained = config_dict.placeholder(str)

  config.loss = ml_collections.ConfigDict()
  config.loss.cross_entropy = 1.0
  config.loss.triplet = 0.5
  config.loss.center = 0.003
  config.loss.consistency = 0.1
  config.loss.reconstruction = 1.0
  config.loss.triplet_margin = 0.3
  config.loss.soft_margin = False
  config.loss.cosine_margin = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"
  config.optim.base_learning_rate = 0.1
  config.optim.scale_by_batch = True  # x (P x K) / 64
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"  # or "step"
  config.optim.decay_boundaries = (0.5, 0.75)  # "step": fractions of num_train_steps
  config.optim.decay_factor = 0.1
  config.optim.clip_grad_norm = 0.0  # 0: no clipping

  config.disc_optim = ml_collections.ConfigDict()
  config.disc_optim.name = "adam"
  config.disc_optim.base_learning_rate = 1e-4
  config.disc_optim.scale_by_batch = False
  config.disc_optim.warmup_steps = 0
  config.disc_optim.schedule = "constant"

  config.num_train_steps = 1200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  # Steps in a row whose loss, gradients or update went non-finite (none is applied) before the
  # run stops with an error (docs/faults.md).
  config.max_bad_steps = 5

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 128
  config.eval.flip = True
  config.eval.distance = "cosine"
  config.eval.max_rank = 20
  config.eval.raw_pixel_baseline = True
  # Pictures under WORKDIR/eval/ and in TensorBoard (docs/pictures.md): CMC curves, ranked
  # gallery grids of `num_grid_queries` queries (drawn with config.seed), modality-weight
  # histograms and a 2-D embedding map ("pca" or "tsne"), with an offline index.html.
  config.eval.pictures = True
  config.eval.num_grid_queries = 8
  config.eval.embedding_map = "pca"

  if preset in ("demo", "conditions"):
    # From scratch on a CPU in minutes: AdamW, a short warm-up and lighter erasing converge in
    # 1,500 steps where the paper's SGD recipe (for ImageNet-initialised ResNet-50) does not.
    config.optim.name = "adamw"
    config.optim.base_learning_rate = 3e-3
    config.optim.scale_by_batch = False
    config.optim.warmup_steps = 50
    config.augment.erasing_prob = 0.3
    config.augment.channel_prob = 0.5
    # Every tuple holds every modality and is embedded both ways (docs/results.md, "Scene
    # conditions"): fused, which trains the modal attention and the correlation branch, and
    # each modality alone, the embedding cross-modal retrieval uses. The fused view's gradient
    # stops at the backbone: with it, the backbone learns features that complement each other
    # instead of features shared across modalities (ir->rgb Rank-1 43.0 against 62.7).
    config.data.single_modality_frac = 0.0
    config.model.train_alone_views = True
    config.model.fused_view_detached = True
    config.num_train_steps = 1500
    config.checkpoint_every_steps = 250
    if preset == "conditions":
      # The demo's identities and nuisances in a mix of scene conditions where one sensor fails
      # (synthetic_mm.CONDITION_MIX), twice the demo's test identities.
      config.data.name = "synthetic_mm/conditions"
  elif preset == "tiny":
    config.data.name = "synthetic_mm/tiny"
    config.data.height, config.data.width = 32, 16
    config.data.num_identities, config.data.tuples_per_identity = 4, 2
    config.model.width = 8
    config.model.embed_dim = 16
    config.model.part_dim = 4
    config.model.attention_dim = 8
    config.model.discriminator_hidden = 16
    config.optim.warmup_steps = 2
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.eval.batch_size = 16
  elif preset == "paper":
    config.data.height, config.data.width = 288, 144
    config.augment.pad = 10
    config.model.depth = 50
    config.model.width = 64
    config.model.embed_dim = 512
    config.model.part_dim = 128
    config.model.attention_dim = 64
    config.optim.warmup_steps = 1000
    config.num_train_steps = 12000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
  else:
    raise ValueError(f"Unknown preset {preset!r} of configs/synthetic.py; expected 'demo', "
                     "'conditions', 'tiny' or 'paper'.")
  return config
