"""Stand-in for VideoTuna's vendored Wan2.1 package (``videotuna.models.wan.wan``)."""

from . import configs, modules
from .text2video import WanT2V
