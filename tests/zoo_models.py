"""Tiny third-party architectures built from configs (no downloads), for the zoo tests.

Each builder takes the attention implementation ("eager" or "sdpa") and returns a Case: the
float64 model as Hugging Face builds it, the output attribute the tests' loss reads (logits or
last_hidden_state), and a function making the keyword tensors of a batch of b samples."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

D = torch.float64
T, V = 8, 64
SIZES = (4, 3, 5)  # batch sizes of a run: a static graph, then one dynamic graph for the others


class Case(NamedTuple):
    """A model, the attribute of its output that the test's loss reads, and `inputs(b)`: the
    keyword tensors of a batch of b >= 3 samples, as a caller passes them."""
    model: nn.Module
    key: str
    inputs: Callable[[int], dict]


def padding_mask(b, left=False):
    """(b, T) with zeros in two rows: row 1 right-padded, row 2 padded on the left or right."""
    m = torch.ones(b, T, dtype=torch.long)
    m[1, -3:] = 0
    if left:
        m[2, :2] = 0
    else:
        m[2, -1:] = 0
    return m


def ids_and_mask(left=False):
    return lambda b: {"input_ids": torch.randint(1, V, (b, T)), "attention_mask": padding_mask(b, left)}


def pixels(c=3, s=16):
    return lambda b: {"pixel_values": torch.randn(b, c, s, s, dtype=D)}


def build(cls_name, cfg_name, impl, **cfg):
    import transformers

    config = getattr(transformers, cfg_name)(**cfg)
    config._attn_implementation = impl
    model = getattr(transformers, cls_name)(config)
    return model.to(D)


SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             vocab_size=V, max_position_embeddings=32)
DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = dict(SMALL, num_key_value_heads=1, attention_dropout=0.0, pad_token_id=0)


def text(cls, cfg, key="last_hidden_state", left=False, **kw):
    return lambda impl: Case(build(cls, cfg, impl, **kw), key, ids_and_mask(left))


MODELS = {
    # --- text, decoders -------------------------------------------------------------------------
    "gpt2": text("GPT2LMHeadModel", "GPT2Config", "logits", vocab_size=V, n_positions=32, n_embd=16,
                 n_layer=1, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt_neo": text("GPTNeoModel", "GPTNeoConfig", vocab_size=V, max_position_embeddings=32, hidden_size=16,
                    num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4,
                    intermediate_size=32, attention_dropout=0.0, resid_dropout=0.0, embed_dropout=0.0),
    "gptj": text("GPTJModel", "GPTJConfig", vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                 rotary_dim=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "codegen": text("CodeGenModel", "CodeGenConfig", vocab_size=V, n_positions=32, n_ctx=32, n_embd=16,
                    n_layer=1, n_head=2, rotary_dim=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "opt": text("OPTModel", "OPTConfig", vocab_size=V, max_position_embeddings=32, hidden_size=16,
                num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16,
                dropout=0.0, attention_dropout=0.0, pad_token_id=0),
    "bloom": text("BloomModel", "BloomConfig", vocab_size=V, hidden_size=16, n_layer=1, n_head=2,
                  hidden_dropout=0.0, attention_dropout=0.0),
    "llama": text("LlamaForCausalLM", "LlamaConfig", "logits", **LLAMA),
    "mistral": text("MistralModel", "MistralConfig", sliding_window=4, **LLAMA),
    "qwen2": text("Qwen2Model", "Qwen2Config", **LLAMA),
    "gemma": text("GemmaModel", "GemmaConfig", head_dim=8, **LLAMA),
    "phi": text("PhiModel", "PhiConfig", resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5, **LLAMA),
    "falcon": text("FalconModel", "FalconConfig", vocab_size=V, hidden_size=16, num_hidden_layers=1,
                   num_attention_heads=2, hidden_dropout=0.0, attention_dropout=0.0, new_decoder_architecture=False,
                   multi_query=True, parallel_attn=True, bias=False),
    "mixtral": text("MixtralModel", "MixtralConfig", experts_implementation="batched_mm", num_local_experts=4,
                    num_experts_per_tok=2, **LLAMA),
    "gpt_neox": text("GPTNeoXModel", "GPTNeoXConfig", rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                     **{k: v for k, v in SMALL.items()}),
    # --- text, encoders -------------------------------------------------------------------------
    "bert": text("BertModel", "BertConfig", **SMALL, **DROP),
    "roberta": text("RobertaModel", "RobertaConfig", pad_token_id=0, **SMALL, **DROP),
    "distilbert": text("DistilBertModel", "DistilBertConfig", vocab_size=V, dim=16, n_layers=1, n_heads=2,
                       hidden_dim=32, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0),
    "albert": text("AlbertModel", "AlbertConfig", embedding_size=8, **SMALL, **DROP),
    "electra": text("ElectraModel", "ElectraConfig", embedding_size=8, **SMALL, **DROP),
    "deberta_v2": text("DebertaV2Model", "DebertaV2Config", relative_attention=True, position_buckets=8,
                       max_relative_positions=16, pos_att_type=["p2c", "c2p"], **SMALL, **DROP),
    # --- vision ---------------------------------------------------------------------------------
}

VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
           patch_size=4, num_channels=3, **DROP)


def vision(cls, cfg, key="last_hidden_state", c=3, s=16, **kw):
    return lambda impl: Case(build(cls, cfg, impl, **kw), key, pixels(c, s))


def seq2seq(cls, cfg, key="last_hidden_state", **kw):
    def inputs(b):
        return {**ids_and_mask()(b), "decoder_input_ids": torch.randint(1, V, (b, 5))}
    return lambda impl: Case(build(cls, cfg, impl, **kw), key, inputs)


def audio(cls, cfg, key="last_hidden_state", n=400, **kw):
    def inputs(b):
        mask = torch.ones(b, n, dtype=torch.long)
        mask[1, -150:] = 0
        return {"input_values": torch.randn(b, n, dtype=D), "attention_mask": mask}

    def make(impl):
        model = build(cls, cfg, impl, **kw)
        # The feature encoder sets its output's requires_grad in the forward (for gradient
        # checkpointing), which no graph can trace; its parameters stay trainable without it.
        model.feature_extractor._requires_grad = False
        return Case(model, key, inputs)
    return make


W2V = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
           conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
           num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
           feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, vocab_size=V)

MODELS.update({
    "t5": seq2seq("T5Model", "T5Config", vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0),
    "bart": seq2seq("BartModel", "BartConfig", vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                    max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "vit": vision("ViTModel", "ViTConfig", **VIT),
    "deit": vision("DeiTModel", "DeiTConfig", **VIT),
    "beit": vision("BeitModel", "BeitConfig", use_relative_position_bias=True, layer_scale_init_value=0.1,
                   use_mask_token=False, **VIT),
    "dinov2": vision("Dinov2Model", "Dinov2Config", layerscale_value=0.1, **VIT),
    "swin": vision("SwinModel", "SwinConfig", image_size=16, patch_size=2, embed_dim=8, depths=[1, 1],
                   num_heads=[2, 2], window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
    "convnext": vision("ConvNextModel", "ConvNextConfig", "pooler_output", num_channels=3, patch_size=2,
                       num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], layer_scale_init_value=0.1,
                       drop_path_rate=0.0),
    "convnextv2": vision("ConvNextV2Model", "ConvNextV2Config", "pooler_output", num_channels=3, patch_size=2,
                         num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], drop_path_rate=0.0),
    "resnet": vision("ResNetModel", "ResNetConfig", "pooler_output", embedding_size=8, hidden_sizes=[8, 16],
                     depths=[1, 1], layer_type="basic"),
    "mobilevit": vision("MobileViTModel", "MobileViTConfig", "pooler_output", image_size=16, patch_size=2,
                        hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2,
                        expand_ratio=2.0, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        classifier_dropout_prob=0.0),
    "clip_vision": vision("CLIPVisionModel", "CLIPVisionConfig", hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4,
                          attention_dropout=0.0),
    "siglip_vision": vision("SiglipVisionModel", "SiglipVisionConfig", hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4,
                            attention_dropout=0.0),
    "wav2vec2": audio("Wav2Vec2Model", "Wav2Vec2Config", feat_extract_norm="layer", **W2V),
    "wav2vec2_group": audio("Wav2Vec2Model", "Wav2Vec2Config", feat_extract_norm="group", **W2V),
    "hubert": audio("HubertModel", "HubertConfig", feat_extract_norm="layer", **W2V),
    "wavlm": audio("WavLMModel", "WavLMConfig", feat_extract_norm="layer", num_buckets=8, max_bucket_distance=16,
                   **W2V),
})


def whisper(impl):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=8, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    cfg._attn_implementation = impl
    return Case(WhisperEncoder(cfg).to(D), "last_hidden_state",
                lambda b: {"input_features": torch.randn(b, 8, 16, dtype=D)})


MODELS["whisper_encoder"] = whisper
