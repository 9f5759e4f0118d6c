"""jaxft: fine-tune torchvision CNNs in pure-functional JAX/Flax, with torch weight import/export."""

from jaxft import runtime

runtime.configure()  # XLA flags and the compilation cache, before JAX starts a backend


from jaxft.convert import ConversionError, from_torch, to_torch
from jaxft.models import ARCHS, UnknownArchError, create_model
from jaxft.pretrained import PretrainedInfo, load_pretrained
from jaxft.weights import WeightsError

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "ConversionError",
    "PretrainedInfo",
    "UnknownArchError",
    "WeightsError",
    "create_model",
    "from_torch",
    "load_pretrained",
    "to_torch",
]
