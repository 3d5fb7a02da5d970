"""Learned context compressor (ARC-Encoder, ICAE memory tokens): an encoder that turns context spans into a few
vectors a decoder reads in place of the spans' token embeddings (issue 24; model side). See pooling.py for the
pooling and its position choice, attention.py for the within-span mask."""

from .compressor import MAIN, NO_TASK, Compressed, ContextCompressor
from .config import CompressorModelConfig, SeparateEncoder, TruncatedEncoder, encoder_model_config
from .encoder import EncodedSpans, SpanEncoder
from .projector import CONT, REC, Projector
from .spans import Spans

__all__ = ["CONT", "MAIN", "NO_TASK", "REC", "Compressed", "CompressorModelConfig", "ContextCompressor",
           "EncodedSpans", "Projector", "SeparateEncoder", "SpanEncoder", "Spans", "TruncatedEncoder",
           "encoder_model_config"]
