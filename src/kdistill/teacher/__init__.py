"""Teachers: the protocol the Distiller calls (``Teacher``), a live network
(``LiveTeacher``), an offline cache of its outputs (``TeacherCache``) and a live network
sharded across processes with FSDP2 (``ShardedTeacher``)."""

from .base import Teacher
from .cache import CacheError, CacheMismatchError, TeacherCache, estimate_size
from .live import LiveTeacher
from .sharded import ShardedTeacher

__all__ = ["CacheError", "CacheMismatchError", "LiveTeacher", "ShardedTeacher", "Teacher", "TeacherCache", "estimate_size"]
