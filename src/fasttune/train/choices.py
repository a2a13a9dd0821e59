"""The names a config's lr_scheduler_type and optim take, apart from the code that builds them (train/optim.py),
so that checking a config imports neither torch nor transformers."""

# transformers.SchedulerType's values (5.x). The schedules themselves are transformers' own code (transformers.get_scheduler).
SCHEDULE_NAMES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# Those that need an evaluation metric each step (ReduceLROnPlateau, "greedy"), which fasttune's loop does not feed.
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
SIMPLE_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")  # need no keywords
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
# transformers' other optimizers, built as its Trainer builds them (train/optim.py): a plain class over the param
# groups. Not here: GaLore / APOLLO / LOMO and the layer-wise ones (they hook the backward), schedule-free ones (they
# switch modes with train/eval), and the XLA / NPU ones.
BORROWED_OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adafactor", "lion_8bit", "lion_32bit", "paged_lion_8bit",
                       "paged_lion_32bit", "paged_adamw_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit",
                       "paged_ademamix_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
                       "adamw_torch_4bit", "adamw_torch_8bit", "adamw_anyprecision", "grokadamw", "stable_adamw")
