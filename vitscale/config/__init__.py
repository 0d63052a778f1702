"""The experiment config, the bottom layer of vitscale: it imports nothing else of the package.

- ``schema.py``: the typed sections (model, data, parallel, optim, train, log, run, checkpoint, eval).
- ``loading.py``: YAML + ``key.sub=value`` overrides -> a checked ``Config``; YAML back out.
- ``validation.py``: the checks that need only the config; the layout checks that need the world size.
- ``deepspeed.py``: the DeepSpeed config composed from the experiment and a preset (the one place),
  and DeepSpeed's monitor sections for ``log.*``.

Checks that need the model or the data run in ``vitscale.experiment``.
"""
from vitscale.config.deepspeed import compose_ds_config, compose_monitor_config, find_preset, own_clipping
from vitscale.config.loading import config_to_dict, dump_config, find_config, load_config, parse_override, save_config
from vitscale.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, LogConfig,
                                    ModelConfig, MoEConfig, OptimConfig, PackingConfig, ParallelConfig, RunConfig,
                                    TrainConfig, all_keys)
from vitscale.config.validation import Layout, validate_layout

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "Layout", "LogConfig",
           "ModelConfig", "MoEConfig", "OptimConfig", "PackingConfig", "ParallelConfig", "RunConfig", "TrainConfig",
           "all_keys", "compose_ds_config", "compose_monitor_config", "config_to_dict", "dump_config", "find_config", "find_preset",
           "load_config", "own_clipping", "parse_override", "save_config", "validate_layout"]
