"""Model families (Vim, PlainMamba), the registry, and loading from files, folders and the Hub."""

from ssmtrim.models.registry import DataConfig, ModelSpec, PretrainedCfg, create_model, get_spec, list_models

__all__ = ["DataConfig", "ModelSpec", "PretrainedCfg", "create_model", "get_spec", "list_models"]
