"""TransNormerLLM configuration for Hugging Face transformers (self-contained; shipped in exported folders).

Field names follow the released TNL checkpoints (OpenNLPLab/TransNormerLLM-*), so their config.json files load
here and ours load there. Only the variant lightspan trains is supported by the modeling file: SimpleRMSNorm,
silu on q/k, no GLU activation, no biases, hidden_dim == decoder_embed_dim.

Hybrids: `attention_pattern` is a string of letters L (lightning attention layer) and S (causal softmax attention
with RoPE of base `rope_theta`), tiled over the layers; the default "L" (all lightning) is the released TNL, so
config.json files without these fields load as before.
"""
from transformers import PretrainedConfig


class TransnormerConfig(PretrainedConfig):
    model_type = "transnormer"
    keys_to_ignore_at_inference = ["recurrent_cache"]
    # generic names some transformers utilities look for
    attribute_map = {"hidden_size": "decoder_embed_dim", "num_hidden_layers": "decoder_layers",
                     "num_attention_heads": "decoder_attention_heads"}

    def __init__(
        self,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        vocab_size=64000,
        use_cache=True,
        init_std=0.02,
        decoder_embed_dim=1024,
        decoder_layers=24,
        decoder_attention_heads=8,
        no_scale_embedding=False,
        add_bos_token=False,
        norm_type="simplermsnorm",
        linear_use_lrpe_list=None,
        hidden_dim=1024,
        linear_act_fun="silu",
        glu_dim=2816,
        glu_act="none",
        bias=False,
        norm_eps=1e-6,
        attention_pattern="L",
        rope_theta=10000.0,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        self.init_std = init_std
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.no_scale_embedding = no_scale_embedding
        self.add_bos_token = add_bos_token
        self.norm_type = norm_type
        # one 0/1 flag per layer; the released models use LRPE on layer 0 only
        self.linear_use_lrpe_list = (list(linear_use_lrpe_list) if linear_use_lrpe_list is not None
                                     else [1] + [0] * (decoder_layers - 1))
        self.hidden_dim = hidden_dim
        self.linear_act_fun = linear_act_fun
        self.glu_dim = glu_dim
        self.glu_act = glu_act
        self.bias = bias
        self.norm_eps = norm_eps
        # hybrids: one letter per layer, L lightning / S softmax (RoPE), tiled over the layers ("LLLLLLLS")
        self.attention_pattern = attention_pattern
        self.rope_theta = rope_theta  # RoPE base of the S layers
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_kind(self, layer: int) -> str:
        """'L' (lightning) or 'S' (softmax) for layer `layer`: attention_pattern tiled over the layers."""
        pattern = self.attention_pattern or "L"
        return pattern[layer % len(pattern)]
