"""Teachers: the protocol the Distiller calls (``Teacher``), a live network
(``LiveTeacher``) and an offline cache of its outputs (``TeacherCache``)."""

from .base import Teacher
from .cache import CacheError, CacheMismatchError, TeacherCache, estimate_size
from .live import LiveTeacher

__all__ = ["CacheError", "CacheMismatchError", "LiveTeacher", "Teacher", "TeacherCache", "estimate_size"]
