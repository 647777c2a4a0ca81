"""Models by name (`config.model.name`)."""

from __future__ import annotations

import flax.linen as nn

from mmreid_jax.models.heads import ModalityDiscriminator
from mmreid_jax.models.reid import AGW, MultimodalReID
from mmreid_jax.models.resnet import ResNet

MODELS: dict[str, type[nn.Module]] = {
    "joint_attention": MultimodalReID,
    "agw": AGW,
}

__all__ = ["AGW", "MODELS", "ModalityDiscriminator", "MultimodalReID", "ResNet"]
