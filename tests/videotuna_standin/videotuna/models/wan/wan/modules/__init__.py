from .model import WanModel
from .t5 import T5Encoder, T5EncoderModel
from .tokenizers import HuggingfaceTokenizer
from .vae import WanVAE
