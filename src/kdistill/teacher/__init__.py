"""Teachers: a live network (``LiveTeacher``) and an offline cache of its outputs
(``TeacherCache`` builds and opens one, ``CachedTeacher`` serves it)."""

from .cache import CacheError, CachedTeacher, CacheMismatchError, TeacherCache, estimate_size
from .live import LiveTeacher

__all__ = ["CacheError", "CacheMismatchError", "CachedTeacher", "LiveTeacher", "TeacherCache", "estimate_size"]
