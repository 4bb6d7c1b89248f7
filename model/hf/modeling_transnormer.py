"""TransNormerLLM (TNL) for Hugging Face transformers: self-contained, plain PyTorch (torch + transformers only).

Shipped into every folder `lightspan convert --to hf` writes; loaded with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. It computes what lightspan's
`model/tnl.py` computes:

    block:        x = x + TokenMixer(SRMSNorm(x));  x = x + SGLU(SRMSNorm(x));  final SRMSNorm; lm_head tied
    token mixer:  q, k, v, u = split(x W_qkvu);  q, k = silu(q), silu(k);  LRPE on listed layers
                  S_t = λ_h S_{t-1} + k_tᵀ v_t,  o_t = q_t S_t   (no 1/sqrt(d) scale)
                  y = (SRMSNorm_over_all_heads(o) ⊙ u) W_o
    decay:        λ_{h,l} = exp(-s_h (1 - l/(L-1) + 1e-5)), s_h the ALiBi slopes (factor 1 for one layer)

Hybrids (`config.attention_pattern`, letters L / S tiled over the layers): an S layer mixes tokens with causal
softmax attention instead, Llama-style (what lightspan's `model/softmax_attention.py` SoftmaxMixer computes):

    softmax mixer: q, k, v = x W_q, x W_k, x W_v;  q, k = RoPE(q), RoPE(k) at the global positions
                   (rotate-half convention, frequencies rope_theta^(-2i/head_dim), angles in fp32)
                   o = softmax(q kᵀ / sqrt(head_dim) + causal mask) v;  y = o W_o

Decoding carries the cache `TransnormerRecurrentCache`: per lightning layer one fp32 (B, H, Dk, Dv) recurrent
state, per softmax layer the past keys (after RoPE) and values (B, H, past, head_dim), plus the number of tokens
consumed (the LRPE / RoPE position offset). A 2-D attention mask with zeros (left padding) zeroes k and v at the
padded positions of lightning layers, so they add nothing to the state, and removes the padded keys from the
softmax of S layers (the cache keeps which past keys were padding); LRPE and RoPE depend only on t - s, so the
shifted positions of a left-padded row do not change its result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_transnormer import TransnormerConfig

_HF_MAJOR = int(transformers.__version__.split(".")[0])
BLOCK = 64  # block size of the prefill form; any value gives the same result


# ----------------------------------------------------------------------------------------------------------
# lightning attention, plain PyTorch
# ----------------------------------------------------------------------------------------------------------
def lightning_attention(q, k, v, slope, state=None, block: int = BLOCK):
    """Blockwise linear attention with decay; exact, fp32 accumulation (fp64 for fp64 inputs).

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,) with λ = exp(-slope); state: (B, H, Dk, Dv) or None.
    For a block of n tokens (i, j = 0..n-1) entering with state S:
        o_i   = λ^{i+1} q_i S + Σ_{j<=i} λ^{i-j} (q_i·k_j) v_j
        S_out = λ^n S + Σ_j λ^{n-1-j} k_jᵀ v_j
    Returns (o: (B, H, T, Dv) in q's dtype, final state (B, H, Dk, Dv) in the accumulation dtype).
    """
    b, h, t, dk = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = slope.to(device=q.device, dtype=acc).view(1, h, 1, 1)
    if state is None:
        state = torch.zeros(b, h, dk, v.shape[-1], device=q.device, dtype=acc)
    else:
        state = state.to(acc)
    outs = []
    for start in range(0, t, block):
        qb, kb, vb = qf[:, :, start:start + block], kf[:, :, start:start + block], vf[:, :, start:start + block]
        n = qb.shape[2]
        idx = torch.arange(n, device=q.device, dtype=acc)
        diff = idx.view(n, 1) - idx.view(1, n)
        causal = torch.exp(-s * diff.clamp(min=0)) * (diff >= 0)  # (1, H, n, n): λ^{i-j} for j <= i
        o = ((qb @ kb.transpose(-1, -2)) * causal) @ vb
        o = o + (qb @ state) * torch.exp(-s * (idx + 1).view(1, 1, n, 1))
        k_decayed = kb * torch.exp(-s * (n - 1 - idx).view(1, 1, n, 1))
        state = torch.exp(-s * n) * state + k_decayed.transpose(-1, -2) @ vb
        outs.append(o)
    return torch.cat(outs, dim=2).to(q.dtype), state


def alibi_slopes(heads: int) -> list:
    """ALiBi head slopes 2^(-8(h+1)/H); for non-powers of two, the ALiBi interleave rule."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def decay_slopes(heads: int, layer: int, layers: int) -> list:
    factor = 1.0 if layers == 1 else 1.0 - layer / (layers - 1) + 1e-5
    return [s * factor for s in alibi_slopes(heads)]


# ----------------------------------------------------------------------------------------------------------
# the recurrent cache
# ----------------------------------------------------------------------------------------------------------
class TransnormerRecurrentCache:
    """What decoding carries, per layer: a lightning layer's fp32 state (B, H, Dk, Dv), a softmax layer's
    (keys after RoPE, values), each (B, H, seen_tokens, head_dim); `seen_tokens` (the LRPE / RoPE offset);
    `key_mask`: (B, seen_tokens) bool, False at padded positions, or None when no position was padding (kept
    only for models with softmax layers, whose past keys it masks).
    """

    def __init__(self, states=None, seen_tokens: int = 0, key_mask=None):
        self.states = list(states) if states is not None else None
        self.seen_tokens = seen_tokens
        self.key_mask = key_mask

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows of every state (and of the key mask)."""

        def pick(x):
            return x.index_select(0, beam_idx.to(x.device))

        if self.states is not None:
            self.states = [tuple(pick(z) for z in s) if isinstance(s, tuple) else pick(s) for s in self.states]
        if self.key_mask is not None:
            self.key_mask = pick(self.key_mask)

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)


@dataclass
class TransnormerModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.FloatTensor] = None
    recurrent_cache: Optional[TransnormerRecurrentCache] = None
    hidden_states: Optional[tuple] = None


@dataclass
class TransnormerCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    recurrent_cache: Optional[TransnormerRecurrentCache] = None
    hidden_states: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------
class SimpleRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), no weight, computed in fp32."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Lrpe(nn.Module):
    """x -> concat[x cos(θ t), x sin(θ t)]; θ: (H, 1, head_dim), t the global position."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(self.initial_theta(heads, head_dim))

    @staticmethod
    def initial_theta(heads: int, head_dim: int) -> torch.Tensor:
        d = heads * head_dim
        return (10000 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))).reshape(heads, 1, head_dim)

    def forward(self, x, offset: int = 0):
        """x: (B, H, T, head_dim) -> (B, H, T, 2 head_dim)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # angles grow with t: never in half precision
        t = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=dtype).reshape(1, -1, 1)
        angle = self.theta.to(dtype) * t
        return torch.cat([x * torch.cos(angle).to(x.dtype), x * torch.sin(angle).to(x.dtype)], dim=-1)


class NormLinearAttention(nn.Module):
    def __init__(self, config: TransnormerConfig, layer: int):
        super().__init__()
        d = config.decoder_embed_dim
        self.heads = config.decoder_attention_heads
        self.head_dim = config.hidden_dim // self.heads
        self.qkvu_proj = nn.Linear(d, 4 * config.hidden_dim, bias=False)
        self.out_proj = nn.Linear(config.hidden_dim, d, bias=False)
        self.norm = SimpleRMSNorm(config.norm_eps)  # spans all heads
        use_lrpe = config.linear_use_lrpe_list[layer] if layer < len(config.linear_use_lrpe_list) else 0
        self.lrpe = Lrpe(self.heads, self.head_dim) if use_lrpe else None
        # fixed decay (not learned, not in the state dict): a plain list, so meta-device init cannot lose it
        self.slope_values = decay_slopes(self.heads, layer, config.decoder_layers)

    def forward(self, x, state=None, offset: int = 0, mask=None):
        """x: (B, T, D); mask: (B, T) of 0/1 or None. Returns (y: (B, T, D), new state)."""
        b, t, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        if mask is not None:
            keep = mask[:, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        q, k, v = (z.reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        slope = torch.tensor(self.slope_values, dtype=torch.float32, device=x.device)
        o, state = lightning_attention(q, k, v, slope, state)
        o = o.transpose(1, 2).reshape(b, t, -1)
        return self.out_proj(self.norm(o) * u), state


def rotary(x, positions, theta: float):
    """RoPE (rotate-half convention) at `positions` (T,) for x (B, H, T, head_dim); angles in fp32 or better."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=dtype, device=x.device) / hd)
    angles = positions.to(device=x.device, dtype=dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class SoftmaxAttention(nn.Module):
    """The token mixer of a hybrid's S layer: causal softmax self-attention with RoPE."""

    def __init__(self, config: TransnormerConfig, layer: int):
        super().__init__()
        d = config.decoder_embed_dim
        self.heads = config.decoder_attention_heads
        self.head_dim = config.hidden_dim // self.heads
        self.theta = float(config.rope_theta)
        self.q_proj = nn.Linear(d, config.hidden_dim, bias=False)
        self.k_proj = nn.Linear(d, config.hidden_dim, bias=False)
        self.v_proj = nn.Linear(d, config.hidden_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_dim, d, bias=False)

    def forward(self, x, state=None, offset: int = 0, key_mask=None):
        """x: (B, T, D); state: (past keys, past values) or None; key_mask: (B, past + T) bool or None.

        Returns (y: (B, T, D), (keys, values) of the past and these T tokens).
        """
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        positions = torch.arange(offset, offset + t, device=x.device)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        if state is not None:
            k, v = torch.cat([state[0].to(k.dtype), k], dim=2), torch.cat([state[1].to(v.dtype), v], dim=2)
        past = k.shape[2] - t
        if past == 0 and key_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            query_pos = torch.arange(past, past + t, device=x.device)[:, None]
            key_pos = torch.arange(past + t, device=x.device)[None, :]
            allowed = key_pos <= query_pos  # (T, past + T): query i is global position past + i
            if key_mask is not None:
                # padded keys are left out; a padded query still sees itself, so no row of the softmax is empty
                # (its output is never used: later layers mask that position too)
                keep = key_mask[:, None, None, :].to(device=x.device, dtype=torch.bool)
                allowed = allowed & (keep | (key_pos == query_pos))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        return y, (k, v)


class SimpleGLU(nn.Module):
    """l3(l1(x) * l2(x)), no activation."""

    def __init__(self, d: int, glu_dim: int):
        super().__init__()
        self.l1 = nn.Linear(d, glu_dim, bias=False)
        self.l2 = nn.Linear(d, glu_dim, bias=False)
        self.l3 = nn.Linear(glu_dim, d, bias=False)

    def forward(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TransnormerDecoderLayer(nn.Module):
    def __init__(self, config: TransnormerConfig, layer: int):
        super().__init__()
        self.token_norm = SimpleRMSNorm(config.norm_eps)
        self.softmax = config.layer_kind(layer) == "S"
        self.token_mixer = SoftmaxAttention(config, layer) if self.softmax else NormLinearAttention(config, layer)
        self.channel_norm = SimpleRMSNorm(config.norm_eps)
        self.channel_mixer = SimpleGLU(config.decoder_embed_dim, config.glu_dim)

    def forward(self, x, state=None, offset: int = 0, mask=None, key_mask=None):
        """mask: (B, T) 0/1 of these tokens (lightning layers); key_mask: (B, past + T) bool (softmax layers)."""
        mixed, state = self.token_mixer(self.token_norm(x), state, offset, key_mask if self.softmax else mask)
        x = x + mixed
        return x + self.channel_mixer(self.channel_norm(x)), state


def check_supported(config: TransnormerConfig) -> None:
    """Refuse, naming the field, a TNL variant this file does not compute."""
    wanted = {"norm_type": "simplermsnorm", "linear_act_fun": "silu", "glu_act": "none", "bias": False}
    for name, value in wanted.items():
        if getattr(config, name, value) != value:
            raise ValueError(f"config.{name}={getattr(config, name)!r} is not supported (only {value!r})")
    if config.hidden_dim != config.decoder_embed_dim:
        raise ValueError(f"config.hidden_dim ({config.hidden_dim}) must equal decoder_embed_dim "
                         f"({config.decoder_embed_dim})")
    if config.hidden_dim % config.decoder_attention_heads:
        raise ValueError(f"decoder_attention_heads ({config.decoder_attention_heads}) does not divide "
                         f"hidden_dim ({config.hidden_dim})")
    pattern = getattr(config, "attention_pattern", "L")
    if not isinstance(pattern, str) or not pattern or set(pattern) - {"L", "S"}:
        raise ValueError(f"config.attention_pattern must be letters L (lightning) / S (softmax) only, "
                         f"e.g. 'LLLLLLLS', got {pattern!r}")
    if "S" in pattern and (config.hidden_dim // config.decoder_attention_heads) % 2:
        raise ValueError(f"softmax layers need an even head size for RoPE, got "
                         f"{config.hidden_dim // config.decoder_attention_heads}")


class TransnormerPreTrainedModel(PreTrainedModel):
    config_class = TransnormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransnormerDecoderLayer"]
    _is_stateful = True  # the cache is a recurrent state: no assisted decoding, no cache rollback

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Lrpe):
            with torch.no_grad():
                h, _, hd = module.theta.shape
                module.theta.copy_(Lrpe.initial_theta(h, hd))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a key/value cache: ours is the recurrent state


class TransnormerModel(TransnormerPreTrainedModel):
    def __init__(self, config: TransnormerConfig):
        super().__init__(config)
        check_supported(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, padding_idx=None)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        self.layers = nn.ModuleList(TransnormerDecoderLayer(config, i) for i in range(config.decoder_layers))
        self.has_softmax = any(layer.softmax for layer in self.layers)
        self.final_norm = SimpleRMSNorm(config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, recurrent_cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        """input_ids: (B, T); attention_mask: (B, past + T) or None. Returns TransnormerModelOutput."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x * self.embed_scale
        t = x.shape[1]
        offset = recurrent_cache.seen_tokens if recurrent_cache is not None else 0
        states = recurrent_cache.states if recurrent_cache is not None and recurrent_cache.states else None
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -t:].all()):
            mask = attention_mask[:, -t:]
        # softmax layers mask padded keys of the past too: the cache remembers which ones were padding
        past_mask = recurrent_cache.key_mask if recurrent_cache is not None else None
        key_mask = None
        if self.has_softmax and (mask is not None or past_mask is not None):
            b = x.shape[0]
            if past_mask is None:
                past_mask = torch.ones(b, offset, dtype=torch.bool, device=x.device)
            now = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
            key_mask = torch.cat([past_mask.to(x.device), now.to(x.device)], dim=1)
        hidden = [] if output_hidden_states else None
        new_states = []
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(x)
            x, state = layer(x, states[i] if states is not None else None, offset, mask, key_mask)
            new_states.append(state)
        x = self.final_norm(x)
        if hidden is not None:
            hidden.append(x)
        cache = TransnormerRecurrentCache(new_states, offset + t, key_mask) if use_cache else None
        return TransnormerModelOutput(last_hidden_state=x, recurrent_cache=cache,
                                      hidden_states=tuple(hidden) if hidden is not None else None)


class TransnormerForCausalLM(TransnormerPreTrainedModel, GenerationMixin):
    # transformers 5 maps tied targets to sources; 4.x lists the tied keys
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _HF_MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: TransnormerConfig):
        super().__init__(config)
        self.model = TransnormerModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, recurrent_cache=None, inputs_embeds=None, labels=None,
                use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0, **kwargs):
        """Returns logits (B, T, V) (the last `logits_to_keep` positions when > 0) and the recurrent cache.

        labels: (B, T), shifted inside; -100 is ignored.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, recurrent_cache=recurrent_cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states)
        x = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        result = TransnormerCausalLMOutput(loss=loss, logits=logits, recurrent_cache=out.recurrent_cache,
                                           hidden_states=out.hidden_states)
        if return_dict is False:
            return result.to_tuple()
        return result

    # -- generation: the cache is the recurrent state, under its own name -------------------------------
    def prepare_inputs_for_generation(self, input_ids, recurrent_cache=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feed only the tokens the state has not consumed yet (all of them on the first step)."""
        if recurrent_cache is not None and recurrent_cache.seen_tokens > 0:
            inputs = {"input_ids": input_ids[:, recurrent_cache.seen_tokens:].contiguous()}
        elif inputs_embeds is not None:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            inputs = {"input_ids": input_ids.contiguous()}
        inputs.update(recurrent_cache=recurrent_cache, attention_mask=attention_mask, use_cache=use_cache)
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs["recurrent_cache"] = outputs.get("recurrent_cache")
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def _reorder_cache(self, recurrent_cache, beam_idx):  # transformers 4.x beam search
        recurrent_cache.reorder_cache(beam_idx)
        return recurrent_cache
