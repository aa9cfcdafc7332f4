"""The bundled tiny GPT-OSS family: specs in fixtures/models, built on demand, cached and verified; and the
user's own checkpoint folders, checked and identified by content (rlparity.models.user).

    python -m rlparity.models build tiny      # or: from rlparity.models import ensure_model; ensure_model("tiny")
    validate_checkpoint("./my-gpt-oss")       # the folder, or a one-line RlparityError naming what is wrong
"""

from rlparity.models.cache import CACHE_ENV, cache_root, ensure_model
from rlparity.models.checkpoint import Checkpoint, open_checkpoint
from rlparity.models.language import Language
from rlparity.models.specs import ModelSpec, load_spec, model_names
from rlparity.models.tokenizer_info import TokenizerInfo, require_same_tokenizer, tokenizer_info
from rlparity.models.user import checkpoint_config, checkpoint_sha256, validate_checkpoint

__all__ = [
    "CACHE_ENV",
    "Checkpoint",
    "Language",
    "ModelSpec",
    "TokenizerInfo",
    "cache_root",
    "checkpoint_config",
    "checkpoint_sha256",
    "ensure_model",
    "load_spec",
    "model_names",
    "open_checkpoint",
    "require_same_tokenizer",
    "tokenizer_info",
    "validate_checkpoint",
]
