"""videotuna-dpo: VideoDPO preference alignment for text-to-video models, as a VideoTuna plugin."""

__version__ = "0.1.0"
