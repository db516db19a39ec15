"""Teachers: the protocol the Distiller calls (``Teacher``), a live network
(``LiveTeacher``), an offline cache of its outputs (``TeacherCache``), several teachers
combined (``EnsembleTeacher``, rule ``combine_logits``) and a live network sharded across
processes with FSDP2 (``ShardedTeacher``); for language models, a top-k cache of the
teacher's next-token distributions (``TokenCache``)."""

from .base import Teacher
from .cache import CacheError, CacheMismatchError, TeacherCache, estimate_size
from .ensemble import COMBINE_MODES, EnsembleModule, EnsembleTeacher, combine_logits, confidence_weights
from .live import LiveTeacher
from .sharded import ShardedTeacher
from .token_cache import TokenCache

__all__ = ["COMBINE_MODES", "CacheError", "CacheMismatchError", "EnsembleModule", "EnsembleTeacher", "LiveTeacher",
           "ShardedTeacher", "Teacher", "TeacherCache", "TokenCache", "combine_logits", "confidence_weights",
           "estimate_size"]
