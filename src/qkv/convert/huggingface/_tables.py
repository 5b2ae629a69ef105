"""Every ``config.json`` field of each family and what qkv does with it (see `_fields` for the kinds).

Derived from the transformers config classes (``XConfig().to_dict()``, what ``save_pretrained``
writes, the ``attribute_map`` aliases, fields older releases wrote) and checked against what
transformers' modeling code reads: a field it ignores is ignored here too (BART's
``normalize_before`` stays post-norm, as in transformers), a field that changes its numbers is
implemented or accepted only at the value qkv computes.
"""

from __future__ import annotations

from ._common import ACTIVATIONS
from ._fields import IGNORED, Alias, Only, Read, count, flag, fraction, positive, token

ACTS = tuple(sorted(ACTIVATIONS))

# Attributes every transformers config has, and metadata: nothing a forward pass reads.
_GENERIC = dict.fromkeys((
    "transformers_version", "_name_or_path", "name_or_path", "_commit_hash", "model_type", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "gradient_checkpointing", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "_experts_implementation", "experts_implementation", "label2id", "problem_type",
    "finetuning_task", "prefix", "task_specific_params", "tokenizer_class", "initializer_range", "init_std",
    "initializer_factor", "classifier_dropout", "output_past", "is_encoder_decoder",
    # the same numbers, computed in pieces (FFN chunked over positions)
    "chunk_size_feed_forward",
), IGNORED)

# Generation settings (transformers moves them to generation_config.json and ignores them in config.json).
_GENERATION = dict.fromkeys((
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
    "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "forced_decoder_ids", "length_penalty", "max_length", "min_length", "max_new_tokens", "min_new_tokens",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p",
    "typical_p", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id",
), IGNORED)

# Read by every family: the architecture (task head) and the class names.
_HEADS = {
    "architectures": Read("strings", [], null=True),
    "id2label": Read("labels", None, null=True),
    "num_labels": count(None, null=True),
}

# Fields that change transformers' computation when set, accepted only where qkv computes the same.
_FIXED = {
    "pruned_heads": Only(({},), "qkv does not load models with pruned attention heads; use transformers"),
    "tie_encoder_decoder": Only((False,), "qkv does not tie encoder and decoder weights; use transformers"),
    "cross_attention_hidden_size": Only((None,), "qkv does not implement it; use transformers"),
}


def _family(*tables: dict, **fields) -> dict:
    out = {**_GENERIC, **_GENERATION, **_HEADS, **_FIXED}
    for t in tables:
        out.update(t)
    out.update(fields)
    return out


_ENCODER_ONLY = dict(
    is_decoder=Only((False,), "qkv's text encoder attends bidirectionally: set is_decoder to false, or load a "
                              "causal model with transformers"),
    add_cross_attention=Only((False,), "qkv's text encoder has no cross-attention: set add_cross_attention to "
                                       "false, or use transformers"),
)

BERT = _family(
    _ENCODER_ONLY,
    vocab_size=count(), hidden_size=count(), num_hidden_layers=count(), num_attention_heads=count(),
    intermediate_size=count(), max_position_embeddings=count(), type_vocab_size=count(2, lo=0),
    hidden_act=Read("str", "gelu", choices=ACTS), layer_norm_eps=positive(1e-12),
    hidden_dropout_prob=fraction(0.1), attention_probs_dropout_prob=fraction(0.1),
    pad_token_id=token(0),
    # transformers >= 5 dropped relative_key / relative_key_query (and would leave their distance embeddings
    # unused): only absolute positions give the numbers the checkpoint was trained with
    position_embedding_type=Only(("absolute",), "qkv implements absolute position embeddings only; a "
                                                "relative_key model needs transformers < 5"),
    tie_word_embeddings=IGNORED,  # no LM head in the architectures qkv loads
)

GPT2 = _family(
    vocab_size=count(), n_embd=count(), n_layer=count(), n_head=count(), n_positions=count(),
    n_inner=count(None, null=True), activation_function=Read("str", "gelu_new", choices=ACTS),
    layer_norm_epsilon=positive(1e-5), tie_word_embeddings=flag(True),
    bos_token_id=token(), eos_token_id=token(), pad_token_id=token(),
    hidden_size=Alias("n_embd"), max_position_embeddings=Alias("n_positions"), num_attention_heads=Alias("n_head"),
    num_hidden_layers=Alias("n_layer"),
    scale_attn_weights=Only((True,), "qkv scales attention scores by 1/sqrt(head_dim); use transformers"),
    scale_attn_by_inverse_layer_idx=Only((False,), "qkv scales every layer alike; use transformers"),
    add_cross_attention=Only((False,), "qkv's causal LM has no cross-attention; use transformers"),
    is_decoder=IGNORED,  # GPT-2 is causal whatever it says
    # the float32 upcast of transformers' eager path: the same numbers in float32
    reorder_and_upcast_attn=IGNORED,
    resid_pdrop=IGNORED, embd_pdrop=IGNORED, attn_pdrop=IGNORED, n_ctx=IGNORED,
    summary_type=IGNORED, summary_use_proj=IGNORED, summary_activation=IGNORED, summary_proj_to_labels=IGNORED,
    summary_first_dropout=IGNORED, summary_last_dropout=IGNORED,  # the double-heads model's summary head
)

LLAMA = _family(
    vocab_size=count(), hidden_size=count(), intermediate_size=count(), num_hidden_layers=count(),
    num_attention_heads=count(), num_key_value_heads=count(None, null=True), head_dim=count(None, null=True),
    hidden_act=Read("str", "silu", choices=ACTS), max_position_embeddings=count(2048),
    rms_norm_eps=positive(1e-6), tie_word_embeddings=flag(False),
    rope_parameters=Read("dict", None, null=True), rope_scaling=Read("dict", None, null=True),
    rope_theta=positive(10000.0), attention_bias=flag(False), mlp_bias=flag(False),
    bos_token_id=token(), eos_token_id=Read("tokens", None, null=True), pad_token_id=Read("int", None, lo=-1,
                                                                                        null=True),
    attention_dropout=IGNORED, is_decoder=IGNORED, add_cross_attention=IGNORED,
    pretraining_tp=IGNORED,  # transformers >= 5 no longer splits the projections
    partial_rotary_factor=IGNORED,  # Llama's default rotary embedding rotates the whole head
)

# What the Llama-like decoders share (Qwen 2 / 3, Mistral, Gemma 2 / 3, Phi-3): sizes, RoPE (read by
# `decoders.rope`: default, linear, llama3), RMSNorm, special tokens. Each family states its own defaults.
def _decoder(hidden_act: str = "silu", max_positions: int = 2048, eps: float = 1e-6, tie: bool = False,
             theta: float = 10000.0, **fields) -> dict:
    return _family(dict(
        vocab_size=count(), hidden_size=count(), intermediate_size=count(), num_hidden_layers=count(),
        num_attention_heads=count(), num_key_value_heads=count(None, null=True), head_dim=count(None, null=True),
        hidden_act=Read("str", hidden_act, choices=ACTS), max_position_embeddings=count(max_positions),
        rms_norm_eps=positive(eps), tie_word_embeddings=flag(tie),
        rope_parameters=Read("dict", None, null=True), rope_scaling=Read("dict", None, null=True),
        rope_theta=positive(theta),
        bos_token_id=token(), eos_token_id=Read("tokens", None, null=True),
        pad_token_id=Read("int", None, lo=-1, null=True),
        attention_dropout=IGNORED, is_decoder=IGNORED, add_cross_attention=IGNORED,
        # a generation setting (the cache class generate builds; qkv's numbers do not depend on it)
        cache_implementation=IGNORED,
        # remote-code class names (Phi-3 checkpoints still carry them); without trust_remote_code transformers
        # runs its built-in class of the model_type, which is what qkv computes
        auto_map=IGNORED,
    ), fields)


_LAYER_TYPES = Read("strings", None, null=True)  # "full_attention" / "sliding_attention", one per layer
# Qwen 2 / 3: transformers keeps sliding_window only with use_sliding_window, and then (without layer_types)
# makes layers from max_window_layers on sliding
_QWEN = dict(use_sliding_window=flag(False), sliding_window=count(4096, null=True), max_window_layers=count(28, lo=0),
             layer_types=_LAYER_TYPES)
QWEN2 = _decoder(max_positions=32768, **_QWEN)  # q, k, v projections with bias, o without (always)
QWEN3 = _decoder(max_positions=32768, attention_bias=flag(False), **_QWEN)
MISTRAL = _decoder(
    max_positions=4096 * 32, sliding_window=count(4096, null=True),
    # MistralModel reads sliding_window only (transformers warns and ignores layer_types: the Ministral class
    # reads them, a different model_type)
    layer_types=IGNORED,
)
_GEMMA = dict(
    hidden_activation=Read("str", "gelu_pytorch_tanh", choices=ACTS),
    hidden_act=IGNORED,  # older Gemma configs write it too; Gemma 2 / 3's MLP reads hidden_activation only
    head_dim=count(256), query_pre_attn_scalar=Read("positive", 256), attention_bias=flag(False),
    sliding_window=count(4096, null=True), layer_types=_LAYER_TYPES,
    use_bidirectional_attention=Only((None, False), "qkv's causal LM attends causally; load an encoder-style "
                                                    "Gemma with transformers"),
)
GEMMA2 = _decoder(
    max_positions=8192, tie=True, **_GEMMA,
    sliding_window_size=IGNORED,  # older Gemma 2 configs repeat the window here; transformers reads sliding_window
    final_logit_softcapping=Read("positive", 30.0, null=True), attn_logit_softcapping=Read("positive", 50.0, null=True),
)
GEMMA3 = _decoder(
    max_positions=131072, tie=True, theta=1_000_000.0, **_GEMMA,
    final_logit_softcapping=Read("positive", None, null=True),
    # transformers' Gemma 3 stores attn_logit_softcapping but never passes it to its attention: not applied
    attn_logit_softcapping=IGNORED,
    rope_local_base_freq=positive(10000.0),
    sliding_window_pattern=count(6),  # every n-th layer global, when layer_types is absent
    # what transformers >= 5 writes beside layer_types; it does not read it back (layer_types rule)
    _sliding_window_pattern=IGNORED,
)
PHI3 = _decoder(
    max_positions=4096, eps=1e-5, sliding_window=count(None, null=True),
    partial_rotary_factor=Read("float", 1.0, lo=0.0, hi=1.0),
    original_max_position_embeddings=IGNORED,  # read by longrope only, which qkv refuses (rope_parameters)
    resid_pdrop=IGNORED, embd_pdrop=IGNORED,
    attention_bias=IGNORED,  # Phi-3 checkpoints write false; transformers' Phi3Attention has no biases whatever it says
)

T5 = _family(
    vocab_size=count(), d_model=count(), d_kv=count(), d_ff=count(), num_layers=count(), num_heads=count(),
    num_decoder_layers=count(None, null=True), relative_attention_num_buckets=count(32),
    relative_attention_max_distance=count(128), layer_norm_epsilon=positive(1e-6),
    feed_forward_proj=Read("str", "relu"), tie_word_embeddings=flag(True),
    scale_decoder_outputs=Read("bool", None, null=True),
    decoder_start_token_id=token(), eos_token_id=Read("tokens", None, null=True), pad_token_id=token(),
    hidden_size=Alias("d_model"), num_attention_heads=Alias("num_heads"), num_hidden_layers=Alias("num_layers"),
    head_dim=Alias("d_kv"),
    dense_act_fn=IGNORED, is_gated_act=IGNORED,  # transformers derives both from feed_forward_proj
    is_decoder=IGNORED,  # T5ForConditionalGeneration sets its encoder's and decoder's own
    add_cross_attention=IGNORED, dropout_rate=IGNORED, n_positions=IGNORED,
)

_ENCODER_DECODER = dict(
    vocab_size=count(), d_model=count(), encoder_layers=count(), decoder_layers=count(),
    encoder_attention_heads=count(), decoder_attention_heads=count(), encoder_ffn_dim=count(),
    decoder_ffn_dim=count(), activation_function=Read("str", "gelu", choices=ACTS),
    tie_word_embeddings=flag(True),
    hidden_size=Alias("d_model"), num_attention_heads=Alias("encoder_attention_heads"),
    num_hidden_layers=Alias("encoder_layers"),
    dropout=IGNORED, attention_dropout=IGNORED, activation_dropout=IGNORED, encoder_layerdrop=IGNORED,
    decoder_layerdrop=IGNORED, is_decoder=IGNORED, add_cross_attention=IGNORED,
)

BART = _family(
    _ENCODER_DECODER,
    max_position_embeddings=count(), scale_embedding=flag(False),
    decoder_start_token_id=token(2), eos_token_id=Read("tokens", 2, null=True), pad_token_id=token(1),
    # fairseq settings older conversions wrote; transformers' BART ignores them (always post-norm, embedding
    # norm, no final norm, plain logits bias), and so does qkv
    normalize_before=IGNORED, add_final_layer_norm=IGNORED, normalize_embedding=IGNORED, add_bias_logits=IGNORED,
    static_position_embeddings=IGNORED, extra_pos_embeddings=IGNORED, classif_dropout=IGNORED,
)

VIT = _family(
    hidden_size=count(), num_hidden_layers=count(), num_attention_heads=count(), intermediate_size=count(),
    hidden_act=Read("str", "gelu", choices=ACTS), layer_norm_eps=positive(1e-12),
    image_size=Read("size", 224), patch_size=Read("size", 16), num_channels=count(3), qkv_bias=flag(True),
    pooler_output_size=count(None, null=True),
    pooler_act=Only(("tanh",), "qkv's ViT pooler is tanh(dense(class token)); use transformers"),
    hidden_dropout_prob=IGNORED, attention_probs_dropout_prob=IGNORED, is_decoder=IGNORED,
    add_cross_attention=IGNORED, tie_word_embeddings=IGNORED,
    encoder_stride=IGNORED,  # the decoder of ViTForMaskedImageModeling only
)

WHISPER = _family(
    _ENCODER_DECODER,
    num_mel_bins=count(80), max_source_positions=count(1500), max_target_positions=count(448),
    decoder_start_token_id=token(50257), eos_token_id=Read("tokens", 50256, null=True), pad_token_id=token(50256),
    no_timestamps_token_id=token(), suppress_tokens=Read("ids", None, null=True),
    begin_suppress_tokens=Read("ids", None, null=True),
    num_key_value_heads=Alias("encoder_attention_heads"),
    scale_embedding=IGNORED,  # transformers' Whisper computes embed_scale but never applies it
    use_weighted_layer_sum=IGNORED, classifier_proj_size=IGNORED,  # WhisperForAudioClassification only
    apply_spec_augment=IGNORED, mask_time_prob=IGNORED, mask_time_length=IGNORED, mask_time_min_masks=IGNORED,
    mask_feature_prob=IGNORED, mask_feature_length=IGNORED, mask_feature_min_masks=IGNORED,  # training only
    median_filter_width=IGNORED,  # word timestamps
)

# YOLOS (YolosForObjectDetection): a ViT with detection tokens; the set-loss settings are read too (training).
YOLOS = _family(
    hidden_size=count(), num_hidden_layers=count(), num_attention_heads=count(), intermediate_size=count(),
    hidden_act=Read("str", "gelu", choices=ACTS), layer_norm_eps=positive(1e-12),
    image_size=Read("size", [512, 864]),
    # transformers' YOLOS divides by patch_size as one number (a [h, w] patch fails there): an int only
    patch_size=count(16), num_channels=count(3), qkv_bias=flag(True),
    num_detection_tokens=count(100), use_mid_position_embeddings=flag(True),
    hidden_dropout_prob=fraction(0.0), attention_probs_dropout_prob=fraction(0.0),
    auxiliary_loss=flag(False), class_cost=Read("float", 1.0, lo=0.0), bbox_cost=Read("float", 5.0, lo=0.0),
    giou_cost=Read("float", 2.0, lo=0.0), bbox_loss_coefficient=positive(5.0), giou_loss_coefficient=positive(2.0),
    eos_coefficient=positive(0.1),
    is_decoder=IGNORED, add_cross_attention=IGNORED, tie_word_embeddings=IGNORED,
)

# SegFormer (SegformerModel, SegformerForSemanticSegmentation): per-stage lists, one value per encoder block.
SEGFORMER = _family(
    num_channels=count(3), num_encoder_blocks=count(4), num_hidden_layers=Alias("num_encoder_blocks"),
    depths=Read("ids", [2, 2, 2, 2]), sr_ratios=Read("ids", [8, 4, 2, 1]), hidden_sizes=Read("ids", [32, 64, 160, 256]),
    patch_sizes=Read("ids", [7, 3, 3, 3]), strides=Read("ids", [4, 2, 2, 2]),
    num_attention_heads=Read("ids", [1, 2, 5, 8]), mlp_ratios=Read("floats", [4, 4, 4, 4]),
    hidden_act=Read("str", "gelu", choices=ACTS), hidden_dropout_prob=fraction(0.0),
    attention_probs_dropout_prob=fraction(0.0), classifier_dropout_prob=fraction(0.1), drop_path_rate=fraction(0.1),
    decoder_hidden_size=count(256), semantic_loss_ignore_index=Read("int", 255, lo=-2**31),
    reshape_last_stage=Only((True,), "qkv's SegFormer keeps every stage output a (B, C, h, w) map; use transformers"),
    # transformers' SegFormer builds every LayerNorm with torch's default eps (1e-5) and never reads this
    layer_norm_eps=IGNORED,
    # older configs carry these; transformers' SegFormer does not read them (any image size runs)
    image_size=IGNORED, downsampling_rates=IGNORED,
    is_decoder=IGNORED, add_cross_attention=IGNORED, tie_word_embeddings=IGNORED,
)

TABLES = {"bert": BERT, "gpt2": GPT2, "llama": LLAMA, "t5": T5, "bart": BART, "vit": VIT, "whisper": WHISPER,
          "qwen2": QWEN2, "qwen3": QWEN3, "mistral": MISTRAL, "gemma2": GEMMA2, "gemma3_text": GEMMA3, "phi3": PHI3,
          "yolos": YOLOS, "segformer": SEGFORMER}
FAMILY_NAMES = {"bert": "BERT", "gpt2": "GPT-2", "llama": "Llama", "t5": "T5", "bart": "BART", "vit": "ViT",
                "whisper": "Whisper", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma2": "Gemma 2",
                "gemma3_text": "Gemma 3", "phi3": "Phi-3", "yolos": "YOLOS", "segformer": "SegFormer"}

# Side files: the fields read from them are checked; the others are settings qkv does not use.
VIT_PROCESSOR = {"image_mean": Read("floats", None, null=True), "image_std": Read("floats", None, null=True),
                 "resample": Read("int", None, lo=0, null=True)}
YOLOS_PROCESSOR = {**VIT_PROCESSOR, "size": Read("dict", None, null=True)}  # {"shortest_edge", "longest_edge"}
SEGFORMER_PROCESSOR = {**VIT_PROCESSOR, "size": Read("dict", None, null=True),  # {"height", "width"}
                       "do_resize": flag(True), "do_rescale": flag(True), "do_normalize": flag(True),
                       "rescale_factor": positive(1 / 255)}
WHISPER_GENERATION = {
    "decoder_start_token_id": token(), "eos_token_id": Read("tokens", None, null=True), "pad_token_id": token(),
    "no_timestamps_token_id": token(), "suppress_tokens": Read("ids", None, null=True),
    "begin_suppress_tokens": Read("ids", None, null=True),
}

# VisionEncoderDecoderModel (image captioning): the outer config.json holds the encoder's and the decoder's
# configs (each read by its family's table) and the token ids; the same ids are read from the decoder's
# config and from generation_config.json, where transformers' generate looks for them.
CAPTIONING_TOKENS = {"decoder_start_token_id": token(), "bos_token_id": token(),
                     "eos_token_id": Read("tokens", None, null=True), "pad_token_id": token()}
VISION_ENCODER_DECODER = _family(
    encoder=Read("dict"), decoder=Read("dict"), **CAPTIONING_TOKENS,
    tie_word_embeddings=IGNORED,  # transformers sets the outer one false; the decoder's own ties its head
    is_decoder=IGNORED, add_cross_attention=IGNORED,  # older outer configs repeat these defaults; unread
)
