"""Model families, one per file, each a typed config plus modules built from `qkv.nn`.

- `TextEncoder` / `TextEncoderConfig`: BERT family, with classification, token
  classification, question-answering heads and sentence embeddings.
- `CausalLM` / `CausalLMConfig`: GPT-2 and Llama architectures.
- `Seq2Seq` / `Seq2SeqConfig`: T5 and BART.
- `VisionTransformer` / `ViTConfig`: ViT, with an image-classification head.
- `SpeechRecognizer` / `WhisperConfig`: Whisper speech recognition.
- `ImageCaptioner` / `CaptionerConfig`: ViT encoder + cross-attending GPT-2 decoder (captions).
"""

from ._base import Model, ModelOutput
from .causal_lm import CausalLM, CausalLMConfig
from .generation import GenerationConfig
from .seq2seq import Seq2Seq, Seq2SeqConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .speech import SpeechRecognizer, WhisperConfig
from .vision import ViTConfig, VisionTransformer
from .captioning import CaptionerConfig, ImageCaptioner
from .detection import ObjectDetector, YolosConfig
from .segformer import SegformerConfig, SemanticSegmenter

__all__ = ["Model", "ModelOutput", "GenerationConfig", "TextEncoder", "TextEncoderConfig", "CausalLM",
           "CausalLMConfig", "Seq2Seq", "Seq2SeqConfig", "VisionTransformer", "ViTConfig",
           "SpeechRecognizer", "WhisperConfig", "ImageCaptioner", "CaptionerConfig", "ObjectDetector", "YolosConfig",
           "SemanticSegmenter", "SegformerConfig"]
