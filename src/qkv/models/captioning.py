"""Image captioning: a ViT encoder and a GPT-2 style decoder whose blocks cross-attend to the image patches
(the vision-encoder-decoder layout of TrOCR / ViT-GPT2, Li et al., arXiv:2109.10282).

The encoder is `VisionTransformer`, the decoder `CausalLM` with cross-attention in every block (the
block order of `Seq2Seq`'s decoder: self-attention, cross-attention, feed-forward). When the widths
differ, a linear map brings the patches to the decoder's width (transformers' ``enc_to_dec_proj``).
Captions are decoded on the shared generation engine (greedy, sampling, beam search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn import KVCache, Linear, TransformerDecoder
from . import _checks, decoding
from ._base import Model, ModelOutput
from .causal_lm import CausalLM, CausalLMConfig
from .generation import GenerationConfig, cut, options, prepare
from .streaming import cut_at_stop
from .vision import ViTConfig, VisionTransformer

IGNORE_INDEX = -100  # labels at this value add nothing to the loss (transformers' convention)


@dataclass
class CaptionerConfig:
    """An encoder `ViTConfig` and a decoder `CausalLMConfig` (defaults: ViT-Base/16 and GPT-2), plus the
    token ids of the encoder-decoder (the decoder config's own ids are not read).

    Generation starts from ``decoder_start_token_id`` (None: the decoder's ``bos_token_id``), stops at
    ``eos_token_id`` and pads finished captions with ``pad_token_id``. Training shifts ``labels`` right
    behind ``label_start_token_id`` and writes ``label_pad_token_id`` for -100 (None: the generation
    ids); they differ only where a checkpoint's config.json and generation_config.json disagree.
    """

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: CausalLMConfig = field(default_factory=CausalLMConfig)
    decoder_start_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    label_start_token_id: int | None = None
    label_pad_token_id: int | None = None

    def __post_init__(self):
        # dicts: a config saved with dataclasses.asdict (qkv's own folders) read back
        if isinstance(self.encoder, dict):
            self.encoder = ViTConfig(**self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = CausalLMConfig(**self.decoder)
        for name, cls in (("encoder", ViTConfig), ("decoder", CausalLMConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"CaptionerConfig: {name} must be a {cls.__name__} (or a dict of its fields), "
                                f"got {type(getattr(self, name)).__name__}")
        _checks.check_types(self)
        _checks.tokens(self, "decoder_start_token_id", "eos_token_id", "pad_token_id", "label_start_token_id",
                       "label_pad_token_id")
        if self.encoder.num_labels:
            raise ValueError(f"CaptionerConfig: encoder.num_labels={self.encoder.num_labels} must be 0: the "
                             "captioner reads the patch states, a classification head would go unused")
        vocab = self.decoder.vocab_size
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "label_start_token_id",
                     "label_pad_token_id"):
            value = getattr(self, name)
            if any(v >= vocab for v in (value if isinstance(value, list) else [value]) if v is not None):
                raise ValueError(f"CaptionerConfig: {name}={value} is outside the decoder's vocabulary "
                                 f"(vocab_size={vocab})")

    @property
    def start_token_id(self) -> int | None:
        """The first decoder token of generation."""
        return self.decoder_start_token_id if self.decoder_start_token_id is not None else self.decoder.bos_token_id


@dataclass
class CaptionOutput(ModelOutput):
    """`ModelOutput` plus ``loss``: mean cross-entropy of the logits against ``labels`` (-100 ignored)."""

    loss: torch.Tensor | None = None


class _CrossAttendingLM(CausalLM):
    """`CausalLM` whose blocks also cross-attend to ``context`` (B, S, dim), passed to ``forward``."""

    def __init__(self, config: CausalLMConfig):
        super().__init__(config)
        self.stack = TransformerDecoder(config.block(), config.n_layers, final_norm=True)


class ImageCaptioner(Model):
    """ViT encoder -> (linear map to the decoder width) -> cross-attending GPT-2 decoder -> next-token logits."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = c = config
        self.encoder = VisionTransformer(c.encoder)
        dim_in, dim_out = c.encoder.dim, c.decoder.dim
        self.project = Linear(dim_in, dim_out) if dim_in != dim_out else None
        self.decoder = _CrossAttendingLM(c.decoder)

    def encode(self, pixel_values: torch.Tensor, return_weights: bool = False,
               return_hidden: bool = False) -> ModelOutput:
        """pixel_values (B, channels, H, W), normalised -> the encoder's ModelOutput (last_hidden_state
        (B, 1 + patches, encoder dim), attentions, hidden_states)."""
        self._check_pixels(pixel_values)
        return self.encoder(pixel_values, return_weights=return_weights, return_hidden=return_hidden)

    def _check_pixels(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 + len(self.config.encoder.size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (B, channels, H, W) tensor, got {got}; turn images into "
                             "one with model.preprocess(images), or caption them with model.caption(images)")

    def context(self, encoder_output: ModelOutput) -> torch.Tensor:
        """What the decoder cross-attends to: the patch states at the decoder's width (B, S, decoder dim)."""
        h = encoder_output.last_hidden_state
        return self.project(h) if self.project is not None else h

    def shift_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``labels`` (B, T): the start token, then the labels but the last, -100 -> pad."""
        c = self.config
        start = c.label_start_token_id if c.label_start_token_id is not None else c.decoder_start_token_id
        pad = c.label_pad_token_id if c.label_pad_token_id is not None else c.pad_token_id
        if start is None or pad is None:
            missing, role = (("decoder_start_token_id", "before the first label") if start is None
                             else ("pad_token_id", "written for -100"))
            raise ValueError(f"labels need config.{missing} (the token {role}); set it on model.config, or pass "
                             "input_ids yourself")
        ids = labels.new_full(labels.shape, pad)
        ids[:, 0] = start
        ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad)
        return ids

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                encoder_output: ModelOutput | None = None, cache: KVCache | None = None,
                return_weights: bool = False, return_hidden: bool = False, last_only: bool = False) -> CaptionOutput:
        """Encode ``pixel_values`` (B, channels, H, W) (or reuse ``encoder_output``) and decode ``input_ids``
        (B, T), the caption tokens after the start token; without them, ``labels`` (B, T) shifted right
        (`shift_labels`). ``attention_mask`` (B, T): the decoder's padding (the image has none).

        Returns CaptionOutput(last_hidden_state: decoder (B, T, C), logits (B, T, V), loss (with labels),
        attentions: decoder self-attention and cross_attentions (B, H, T, 1 + patches), one per decoder
        layer, and encoder_attentions (with ``return_weights``), encoder_last_hidden_state, hidden_states
        (the decoder's, with ``return_hidden``), cache).
        """
        if encoder_output is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values (B, channels, H, W) or encoder_output")
            encoder_output = self.encode(pixel_values, return_weights=return_weights)
        if input_ids is None:
            if labels is None:
                raise ValueError("pass input_ids (the caption tokens, starting with the start token) or labels")
            input_ids = self.shift_labels(labels)
        if labels is not None and (last_only or labels.shape != input_ids.shape):
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}, "
                             "and need every position's logits (last_only=False)")
        out = self.decoder(input_ids, attention_mask, cache=cache, return_weights=return_weights,
                           return_hidden=return_hidden, last_only=last_only, context=self.context(encoder_output))
        loss = None
        if labels is not None:
            logits = out.logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                                   ignore_index=IGNORE_INDEX)
        return CaptionOutput(out.last_hidden_state, logits=out.logits, attentions=out.attentions,
                             hidden_states=out.hidden_states, cache=cache, cross_attentions=out.cross_attentions,
                             encoder_last_hidden_state=encoder_output.last_hidden_state,
                             encoder_attentions=encoder_output.attentions, loss=loss)

    def preprocess(self, images, size: int | None = None) -> torch.Tensor:
        """PIL images, (H, W, 3) arrays or image paths -> normalised (N, 3, H, W), as the checkpoint's
        image processor does (see `VisionTransformer.preprocess`)."""
        return self.encoder.preprocess(images, size)

    def _prompt(self, decoder_prompt: Sequence[int] | None) -> list[int]:
        if decoder_prompt is not None:
            prompt = [int(t) for t in decoder_prompt]
            if not prompt:
                raise ValueError("decoder_prompt must hold at least one token id (the start token)")
            return prompt
        start = self.config.start_token_id
        if start is None:
            raise ValueError("generation needs a start token: set model.config.decoder_start_token_id (or the "
                             "decoder's bos_token_id), or pass decoder_prompt=[id, ...]")
        return [start]

    def _session(self, pixel_values: torch.Tensor, cfg: GenerationConfig,
                 decoder_prompt: Sequence[int] | None) -> decoding.Session:
        """Encode once (B rows), repeat each image's context `rows_per_prompt` times, decode after the prompt
        with a KV cache (the cross-attention keys and values are computed at the first step and cached)."""
        encoded = self.encode(pixel_values.to(self.device))
        prompt = self._prompt(decoder_prompt)
        limit = self.config.decoder.max_positions
        if self.config.decoder.positions == "learned" and len(prompt) + cfg.max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} plus the {len(prompt)} prompt tokens exceed the "
                             f"decoder's {limit} positions; lower max_new_tokens")
        ctx = self.context(encoded)
        n = decoding.rows_per_prompt(cfg)
        if n > 1:
            ctx = ctx.repeat_interleave(n, 0)
        N = ctx.shape[0]
        first = torch.tensor(prompt, dtype=torch.long, device=ctx.device).expand(N, -1).contiguous()
        cache = KVCache(self.config.decoder.n_layers, capacity=len(prompt) + cfg.max_new_tokens)
        state = {"context": ctx}

        def step(tok: torch.Tensor) -> torch.Tensor:
            # the context is read once: later steps find its keys and values in the cache
            return self.decoder(tok.view(N, -1), cache=cache, last_only=True,
                                context=state.pop("context", None)).logits[:, -1]

        return decoding.Session(step(first), step, cache.select, first, first)

    def _generate(self, pixel_values: torch.Tensor, opts: dict, decoder_prompt):
        self._check_pixels(pixel_values)  # before prepare(), which would read a list of strings as text prompts
        _, _, _, _, gen = prepare(self, pixel_values, None, "right", **opts)
        session = self._session(pixel_values, gen, decoder_prompt)
        return decoding.run(self, session, gen, None, False), gen, session.prompt.shape[1]

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, *, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, suppress_tokens: Sequence[int] | None = None,
                 begin_suppress_tokens: Sequence[int] | None = None, num_beams: int | None = None,
                 length_penalty: float | None = None, early_stopping: bool | str | None = None,
                 num_return_sequences: int | None = None, decoder_prompt: Sequence[int] | None = None):
        """Caption token ids (B * num_return_sequences, prompt + n) for pixel_values (B, channels, H, W):
        the prompt (default: the start token), then the chosen tokens, as transformers'
        ``VisionEncoderDecoderModel.generate``. Options: see `CausalLM.generate` and `GenerationConfig`
        (unset: the checkpoint's generation_config.json, then the config's stop and pad tokens)."""
        ids, _, _ = self._generate(pixel_values, options(locals()), decoder_prompt)
        return ids

    @torch.no_grad()
    def caption(self, images, tokenizer=None, **options) -> str | list:
        """The caption of each image (PIL image, array or path; one image gives one string, a list gives a
        list; a list per image with ``num_return_sequences > 1``). ``tokenizer``: default the folder's;
        ``options``: those of `generate` (``decoder_prompt`` too)."""
        tok = tokenizer if tokenizer is not None else self._require_tokenizer("caption()")
        single = not isinstance(images, (list, tuple))
        prompt = options.pop("decoder_prompt", None)
        pixels = self.preprocess([images] if single else list(images)).to(self.device)
        ids, gen, start = self._generate(pixels, options, prompt)
        texts = [cut_at_stop(tok.decode(cut(row, gen)), gen.stop).strip() for row in ids[:, start:].tolist()]
        n = gen.num_return_sequences
        out = [texts[i * n : (i + 1) * n] for i in range(len(texts) // n)] if n > 1 else texts
        return out[0] if single else out
