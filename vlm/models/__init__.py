"""Model configs, factory, towers, LRCLR local modules and checkpoints."""

from vlm.models.checkpoint import is_checkpoint, save_checkpoint
from vlm.models.config import ModelConfig, config_hash, list_models, load_config
from vlm.models.factory import create_model, create_model_and_transforms, get_tokenizer
from vlm.models.outputs import ImageEmbedding, TextEmbedding

__all__ = ["ImageEmbedding", "ModelConfig", "TextEmbedding", "config_hash", "create_model",
           "create_model_and_transforms", "get_tokenizer", "is_checkpoint", "list_models",
           "load_config", "save_checkpoint"]
