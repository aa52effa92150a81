from . import gan, lenet  # noqa: F401
