"""DiLoCo training core: models, outer optimizer, update encoding and shared helpers.

Pure torch + safetensors. This package never imports trio, ``hypha.net`` or a role; the
trainer and parameter server roles build on it. The names below are its public API.
"""

from hypha.training.compress import (
    ENCODING_METADATA_KEY,
    ENCODINGS,
    Encoding,
    decode_tensors,
    encode_tensors,
    load_tensors_file,
    save_tensors_file,
)
from hypha.training.diloco import (
    cosine_lr,
    evaluate,
    iter_batches,
    load_params,
    params_equal,
    pseudo_gradient,
    snapshot,
)
from hypha.training.models import (
    MODEL_NAMES,
    GPTConfig,
    MLPClassifier,
    MLPConfig,
    TinyGPT,
    batch_loss,
    build_hf_model,
    build_model,
)
from hypha.training.outer import NesterovOuter, weighted_mean

__all__ = [
    "ENCODINGS",
    "ENCODING_METADATA_KEY",
    "MODEL_NAMES",
    "Encoding",
    "GPTConfig",
    "MLPClassifier",
    "MLPConfig",
    "NesterovOuter",
    "TinyGPT",
    "batch_loss",
    "build_hf_model",
    "build_model",
    "cosine_lr",
    "decode_tensors",
    "encode_tensors",
    "evaluate",
    "iter_batches",
    "load_params",
    "load_tensors_file",
    "params_equal",
    "pseudo_gradient",
    "save_tensors_file",
    "snapshot",
    "weighted_mean",
]
