"""Teachers: a live network (``LiveTeacher``); offline caches come beside it."""

from .live import LiveTeacher

__all__ = ["LiveTeacher"]
