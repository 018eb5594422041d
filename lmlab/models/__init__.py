"""Flax linen models: one transformer for decoders and encoders, optional Mixture-of-Experts."""
from lmlab.models.config import ModelConfig, MoeConfig, model_config_from_dict, model_config_to_dict
from lmlab.models.transformer import Transformer
