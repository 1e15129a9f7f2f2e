"""MIRNet and MIRNet-v2 architectures, checkpoint I/O and the model-card registry."""
from .archs import ARCHITECTURES, build, canonical_arch, infer_arch_config
from .cards import TASKS, ModelCard, NoWeightsError, default_for, get, list_cards, lookup, register, shipped_cards
from .checkpoints import CheckpointError, load, read_checkpoint, save
from .mirnet import MIRNet
from .mirnet_v2 import MIRNetV2

__all__ = [
    "ARCHITECTURES", "TASKS", "CheckpointError", "MIRNet", "MIRNetV2", "ModelCard", "NoWeightsError",
    "build", "canonical_arch", "default_for", "get", "infer_arch_config", "list_cards", "load", "lookup",
    "read_checkpoint", "register", "save", "shipped_cards",
]
