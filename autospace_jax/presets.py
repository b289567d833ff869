"""Named configurations; the files under configs/ return these.

They live in the package so that `python -m autospace_jax.main` with no flags finds the
embedded default wherever the package is installed.
"""

import ml_collections


def imagenet() -> ml_collections.ConfigDict:
  """The paper's ImageNet settings (SPEC §2, §5-7): P 1000, K 9, f 40, 40 + 120 epochs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Work directory; empty means ./runs/<timestamp>. --workdir overrides it.
  config.workdir = ""
  # Comma-separated subset of space,search,train, run in that order.
  config.stages = "space,search,train"

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"   # digits | cifar10 | imagenet2012
  config.data.image_size = 224
  config.data.data_dir = ""            # TFDS data_dir ("" = TFDS default; ImageNet needs manual download)
  config.data.shuffle_buffer = 16384

  config.model = ml_collections.ConfigDict()
  config.model.width_multiplier = 1.0
  config.model.layers_per_stage = (4, 4, 4, 4, 4, 1)  # 21 searchable layers

  # Stage 1: search-space evolution.
  config.space = ml_collections.ConfigDict()
  config.space.population_size = 1000        # P
  config.space.num_cells = 9                 # K
  config.space.mutation_interval = 40        # f, steps between evolution rounds
  config.space.warmup_epochs = 40.0          # weights only, cells sampled uniformly
  config.space.evolution_epochs = 120.0
  config.space.batch_size = 256
  config.space.team_sizes = (30, 103, 177, 250)  # T, in equal spans of evolution
  config.space.window = 3                    # W, nodes in a mutation window
  config.space.gene_mutation_probability = 0.125
  config.space.codes = (1, 2, 3, 5)          # operator codes mutation may use
  config.space.madds_cap_ratio = 1.5         # β: cap = β x MAdds(IRB k3 e6)
  config.space.reference_distance = 3        # τ: max r_H to IRB k3 e6 ...
  config.space.reference_stop_epoch = 60     # ... while evolution epoch < this
  config.space.compensation = "rate"         # rate | none
  config.space.population_update = "inplace"  # inplace | aging
  # [choice] The learned space holds the top-K cells computing different functions
  # (duplicate genomes are common: a population of 1000 among ~500 feasible ones);
  # False: the top-K cells, duplicates included.
  config.space.distinct_top_cells = True
  config.space.estimator = "sampled"         # sampled | proxyless
  config.space.learning_rate = 0.025         # SGD Nesterov, cosine
  config.space.momentum = 0.9
  config.space.weight_decay = 4e-5
  # [choice] SPEC §5 decays "the weights": every parameter, BN and biases too, as
  # ProxylessNAS's search does (its no_decay_keys is None). False: kernels only.
  config.space.decay_bn_and_bias = True
  config.space.label_smoothing = 0.1
  config.space.alpha_learning_rate = 1e-3    # Adam, β1 0, β2 0.999
  config.space.alpha_b1 = 0.0
  config.space.alpha_b2 = 0.999

  # Stage 2: ProxylessNAS-style architecture search in a space.
  config.search = ml_collections.ConfigDict()
  config.search.space = "learned"            # learned | irb | PATH to a space file
  config.search.compare_irb = True           # also search the IRB baseline space
  config.search.targets = (340_000_000,)     # MAdds targets (absolute) ...
  config.search.target_fractions = ()        # ... or fractions of the IRB k3 e6 net
  config.search.warmup_epochs = 10.0         # weights only before α is trained
  config.search.epochs = 120.0
  config.search.batch_size = 256
  config.search.learning_rate = 0.025
  config.search.momentum = 0.9
  config.search.weight_decay = 4e-5
  config.search.decay_bn_and_bias = True     # as config.space's (ProxylessNAS's search)
  config.search.label_smoothing = 0.1
  config.search.alpha_learning_rate = 1e-3
  # After warm-up, one α step on a held-out 'search_val' batch (plain CE, a freshly
  # sampled path) after every this many weight steps, as ProxylessNAS does (its default).
  config.search.alpha_update_every = 5
  config.search.beta = 0.6                   # arch loss CE * (log E[MAdds]/log T)^β
  # argmax | nudge: the argmax per layer (SPEC §7), or the argmax then changed one layer
  # at a time until its MAdds are within 5% of the target.
  config.search.derive = "argmax"
  config.search.estimator = "proxyless"      # proxyless | sampled

  # Stage 3: retrain the found net from scratch.
  config.train = ml_collections.ConfigDict()
  config.train.net = ""                      # net JSON; empty = stage 2's result
  config.train.epochs = 300.0
  config.train.batch_size = 256
  config.train.learning_rate = 0.1           # per 256 images, cosine
  config.train.warmup_epochs = 5.0
  config.train.momentum = 0.9
  config.train.weight_decay = 4e-5
  config.train.decay_bn_and_bias = False     # SPEC §7: none on BN and biases
  config.train.label_smoothing = 0.1
  config.train.dtype = "bfloat16"            # bfloat16 | float32 compute
  config.train.se = False                    # SE (ratio 0.25) in every cell
  config.train.eval_every_epochs = 5.0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.log_every_steps = 50
  # Threads compiling supernet programs ahead of the steps that need them (0: none).
  config.precompile_threads = 2
  return config


def cifar10() -> ml_collections.ConfigDict:
  """CIFAR-10 from TFDS: between the embedded default and ImageNet (one GPU, hours)."""
  config = imagenet()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.shuffle_buffer = 10000
  config.model.width_multiplier = 1.0
  config.model.layers_per_stage = (2, 3, 3, 2, 3, 1)
  config.space.population_size = 300
  config.space.num_cells = 9
  config.space.warmup_epochs = 10.0
  config.space.evolution_epochs = 40.0
  config.space.batch_size = 128
  config.space.team_sizes = (20, 40, 60, 80)
  config.space.reference_stop_epoch = 20
  config.search.targets = ()
  config.search.target_fractions = (0.7, 0.85, 1.0)
  config.search.epochs = 40.0
  config.search.batch_size = 128
  config.train.epochs = 200.0
  config.train.batch_size = 128
  return config


def default() -> ml_collections.ConfigDict:
  """Embedded default: digits (ships with scikit-learn), 2 CPU cores, minutes, offline.

  Measured on 2 CPU cores with an empty XLA cache: 2 min 12 s for all three stages.
  Six searchable layers at 32 pixels; stage 2 uses the `sampled` estimator (one path per
  step) because `proxyless` runs every candidate forward; 10 stage-3 epochs at lr 0.1 per
  256 images take every net to 94-98% top-1.
  """
  config = imagenet()
  config.data.name = "digits"
  config.data.image_size = 32
  config.model.width_multiplier = 0.35
  config.model.layers_per_stage = (1, 1, 1, 1, 1, 1)

  config.space.population_size = 100
  config.space.num_cells = 5
  config.space.mutation_interval = 40
  config.space.batch_size = 64
  config.space.warmup_epochs = 2.0
  config.space.evolution_epochs = 22.0  # 10 evolution rounds at f = 40
  config.space.team_sizes = (10, 20, 30, 40)
  config.space.reference_stop_epoch = 12

  config.search.targets = ()
  config.search.target_fractions = (0.7, 0.85, 1.0)
  config.search.batch_size = 64
  config.search.warmup_epochs = 1.0
  config.search.epochs = 2.0
  config.search.learning_rate = 0.025
  config.search.alpha_update_every = 1  # 40 searching steps: α needs every one of them
  config.search.derive = "nudge"  # α is nearly flat after them; meet the targets anyway
  config.search.estimator = "sampled"

  config.train.batch_size = 64
  config.train.epochs = 10.0
  config.train.warmup_epochs = 1.0
  config.train.learning_rate = 0.1
  config.train.dtype = "float32"
  config.train.eval_every_epochs = 5.0
  config.checkpoint.every_steps = 200
  return config


def get_config(name: str = "default") -> ml_collections.ConfigDict:
  """`--config=autospace_jax/presets.py:NAME` picks a preset by name."""
  presets = {"default": default, "cifar10": cifar10, "imagenet": imagenet}
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
  return presets[name]()
