"""keycourier: a transparent encrypting proxy for object storage."""
from importlib.metadata import version

__version__ = version("keycourier")  # the folder proxy/ is only importable as keycourier once installed
