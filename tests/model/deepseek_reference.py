#!/usr/bin/env python3
"""Independent float64 check of Switchyard's DeepSeek-V2 / DeepSeek-V3 forward pass.

This script re-derives the DeepSeek-V2 and DeepSeek-V3 model math (Hugging Face model_type
"deepseek_v2" and "deepseek_v3", hub layout) with numpy alone, and compares it with the logits
`switchyard logits` writes.  Multi-head latent attention (MLA) is computed here the plain way, not
with the "absorbed" trick: the per-head keys and values are expanded explicitly from kv_b_proj, so
this checks Switchyard's compressed-latent-cache implementation (which folds W_uk into the query and
W_uv into the output) independently.

Semantics (transformers' DeepseekV2/DeepseekV3 classes and DeepSeek's own modeling_deepseek.py):

  * RMSNorm: y = w * x / sqrt(mean(x^2) + eps), eps = rms_norm_eps (default 1e-6).
  * MLA, per layer:
      q = q_proj(x) when q_lora_rank is null/0, else q_b_proj(RMSNorm_qa(q_a_proj(x)));
      q per head = [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)].
      kv_a_proj_with_mqa(x) = [latent (kv_lora_rank) | k_rope (qk_rope_head_dim)];
      kv_b_proj(kv_a_layernorm(latent)) per head = [k_nope (qk_nope_head_dim) | v (v_head_dim)]
      (weight [H*(nope+v), kv_lora_rank]); k_rope is a single head shared by all heads, no norm.
      RoPE on q_rope and k_rope.  Interleaved (DeepSeek-V2 always; DeepSeek-V3 when rope_interleave,
      default true): pairs (x[2i], x[2i+1]) rotated by pos*inv_freq[i], the complex-number form of
      DeepSeek's apply_rotary_emb.  Otherwise rotate-half on halves [0, d/2) and [d/2, d).
      scores = q.k * (qk_nope+qk_rope)^-0.5 * mscale^2, where mscale = 0.1*mscale_all_dim*ln(factor)+1
      when the rope scaling is yarn with factor > 1 and mscale_all_dim nonzero; causal softmax;
      o_proj over H*v_head_dim.
  * YaRN (rope_parameters / rope_scaling {rope_type|type "yarn", factor,
    original_max_position_embeddings, beta_fast 32, beta_slow 1, mscale, mscale_all_dim}), over
    dim = qk_rope_head_dim: pos_freqs = base^(arange(0,dim,2)/dim); corr(r) =
    dim*ln(orig_max/(2*pi*r))/(2*ln base); low = floor(corr(beta_fast)), high = ceil(corr(beta_slow)),
    clamped to [0, dim-1]; high += 0.001 when equal; ramp_i = clip((i-low)/(high-low), 0, 1);
    inv_freq = ramp/(factor*pos_freqs) + (1-ramp)/pos_freqs.  cos and sin are multiplied by the
    attention factor: attention_factor when given, else get_mscale(factor, mscale) /
    get_mscale(factor, mscale_all_dim) when both are set and nonzero, else get_mscale(factor, 1), with
    get_mscale(s, m) = 1 if s <= 1 else 0.1*m*ln(s)+1.
  * Layer l is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0; dense layers use
    mlp.{gate,up,down}_proj with intermediate_size.  Pre-norm residual layers, final model.norm,
    lm_head (the embedding when tie_word_embeddings).
  * MoE router: logits = mlp.gate.weight @ x.
      V3 (noaux_tc): scores = sigmoid(logits); choice = scores + mlp.gate.e_score_correction_bias;
        n_group groups, a group's score is the sum of its two best choice values; the best
        topk_group groups are kept, the other experts' choice set to 0.0; top-k of choice; weights
        are the unbiased scores of the chosen; when norm_topk_prob they are divided by (sum + 1e-20);
        then always multiplied by routed_scaling_factor.
      V2: scores = softmax(logits); greedy: top-k of scores; group_limited_greedy: a group's score is
        its best score, the best topk_group groups are kept, others set to 0.0, top-k; weights are
        the chosen scores; when norm_topk_prob and top_k > 1 they are divided by (sum + 1e-20) and
        NOT scaled, otherwise multiplied by routed_scaling_factor (DeepSeek's original V2 rule).
    Routed experts mlp.experts.E.{gate,up,down}_proj (SwiGLU, moe_intermediate_size); shared experts
    mlp.shared_experts.{gate,up,down}_proj of width n_shared_experts*moe_intermediate_size, added
    unscaled.  Ties in top-k go to the lower index (as Switchyard; torch leaves them unspecified).
  * Multi-token-prediction layers (model.layers.{num_hidden_layers}.* and beyond) are ignored.
  * FP8 (quantization_config {quant_method fp8, fmt e4m3, weight_block_size [128, 128]}): an F8_E4M3
    weight is dequantised as W[i, j] = e4m3fn(W[i, j]) * weight_scale_inv[i // 128, j // 128] (tensor
    `<name>_scale_inv`, F32); e4m3fn is decoded here in numpy (bias 7, subnormals, no infinities,
    0x7f / 0xff NaN).

Usage:
  /usr/bin/python3 tests/model/deepseek_reference.py --binary build/apps/switchyard [--workdir DIR]
                   [--cases a,b,...] [--list] [--threads N] [--fixtures DIR] [--reference-only]

Cases:
  * fixture_*: the transformers-made fixtures deepseekv3_e16k4 and deepseekv3_yarn_e16k4 (looked for
    in tests/data/hf-tiny, /work/shared/fixtures/hf-tiny and --fixtures): Switchyard vs numpy, numpy
    vs the fixture's logits and MoE block output, Switchyard vs the fixture's logits.  A fixture not
    found is reported as SKIP.
  * the others: checkpoints this script writes itself in the hub layout (random weights, std 0.1,
    random norm weights), for DeepSeek-V2-Lite-like, DeepSeek-V2-like and DeepSeek-V3-like configs,
    FP8 block-quantised weights, and a checkpoint carrying an MTP layer.

Cases marked [informational] print DIFF on a mismatch but do not change the exit status.
With --reference-only no binary is run: only the fixture cases' numpy-vs-transformers checks.
Needs only numpy (Debian: python3-numpy).  Exit 0 when every case passes, 1 otherwise.
"""

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

TOLERANCE = 1e-4
FIXTURES = ("deepseekv3_e16k4", "deepseekv3_yarn_e16k4")

# ----------------------------------------------------------------------------------------------
# safetensors I/O
# ----------------------------------------------------------------------------------------------

_NP_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


def read_safetensors(path, dtypes=None):
    """Returns {name: np.ndarray}: floating tensors as float64, integers as int64, F8_E4M3 as the raw
    uint8 codes.  When `dtypes` is a dict it receives {name: safetensors dtype string}."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        raw = data[base + start:base + end]
        if dt == "BF16":
            u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
            arr = (u16 << 16).view(np.float32).astype(np.float64)
        elif dt == "F8_E4M3":
            arr = np.frombuffer(raw, dtype=np.uint8).copy()
        elif dt in _NP_DTYPES:
            arr = np.frombuffer(raw, dtype=_NP_DTYPES[dt])
            arr = arr.astype(np.int64 if arr.dtype.kind == "i" else np.float64)
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dt}")
        out[name] = arr.reshape(shape)
        if dtypes is not None:
            dtypes[name] = dt
    return out


def f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def write_safetensors(path, tensors):
    """tensors: {name: (dtype_string, np.ndarray)} with dtype_string in F32, BF16, I64, F8_E4M3 (the
    array then holds the uint8 codes)."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        dt, arr = tensors[name]
        arr = np.asarray(arr)
        if dt == "F32":
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        elif dt == "BF16":
            raw = f32_to_bf16_bits(arr).astype("<u2").tobytes()
        elif dt == "I64":
            raw = np.ascontiguousarray(arr, dtype="<i8").tobytes()
        elif dt == "F8_E4M3":
            if arr.dtype != np.uint8:
                raise ValueError(f"write_safetensors: {name}: F8_E4M3 wants uint8 codes")
            raw = np.ascontiguousarray(arr).tobytes()
        else:
            raise ValueError(f"write_safetensors: unsupported dtype {dt}")
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


def load_checkpoint(model_dir):
    """All tensors of a hub-layout folder (sharded with model.safetensors.index.json, or not), and
    their safetensors dtypes."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    tensors, dtypes = {}, {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(model_dir, name), dtypes))
    return tensors, dtypes


# ----------------------------------------------------------------------------------------------
# FP8 e4m3fn
# ----------------------------------------------------------------------------------------------


def e4m3fn_table():
    """float64 value of every e4m3fn code 0..255: bias 7, subnormals, no infinities, S.1111.111 NaN."""
    codes = np.arange(256, dtype=np.int64)
    sign = codes >> 7
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2((exp - 7).astype(np.float64))
    subnormal = (man / 8.0) * 2.0 ** -6
    val = np.where(exp == 0, subnormal, normal)
    val = np.where(sign == 1, -val, val)
    val[(exp == 0xF) & ((codes & 0x7) == 0x7)] = np.nan
    return val


E4M3 = e4m3fn_table()
E4M3_MAX = 448.0


def e4m3fn_encode(x):
    """Nearest e4m3fn code (ties to the even code) for each value; saturates at +-448."""
    x = np.asarray(x, dtype=np.float64)
    pos = E4M3[:0x7F]  # codes 0x00..0x7e: 0 and every positive finite value, increasing
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.clip(np.searchsorted(pos, a, side="left"), 0, len(pos) - 1)
    lo = np.clip(hi - 1, 0, len(pos) - 1)
    d_hi, d_lo = np.abs(pos[hi] - a), np.abs(a - pos[lo])
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (pick | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def dequant_fp8(codes, scale_inv, block):
    br, bc = block
    rows, cols = codes.shape
    want = (-(-rows // br), -(-cols // bc))
    if scale_inv.shape != want:
        raise ValueError(f"weight_scale_inv has shape {scale_inv.shape}, expected {want} for {codes.shape}")
    s = np.repeat(np.repeat(scale_inv, br, axis=0), bc, axis=1)[:rows, :cols]
    return E4M3[codes] * s


# ----------------------------------------------------------------------------------------------
# Reference forward pass (float64)
# ----------------------------------------------------------------------------------------------


def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


class DeepseekConfig:
    """The config.json keys DeepSeek-V2/V3 read; defaults as transformers' config classes."""

    def __init__(self, j):
        mt = j.get("model_type")
        if mt not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"model_type is {mt!r}, not deepseek_v2 / deepseek_v3")
        self.v3 = mt == "deepseek_v3"
        v3 = self.v3
        act = j.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} not supported by this reference")
        if j.get("attention_bias", False):
            raise ValueError("attention_bias=true is not supported by this reference")
        self.vocab_size = j["vocab_size"]
        self.hidden_size = j["hidden_size"]
        self.intermediate_size = j["intermediate_size"]
        self.moe_intermediate_size = j.get("moe_intermediate_size", 2048 if v3 else 1407)
        self.num_layers = j["num_hidden_layers"]
        self.num_heads = j["num_attention_heads"]
        self.q_lora_rank = j.get("q_lora_rank", 1536) or 0  # null / 0: plain q_proj
        self.kv_lora_rank = j.get("kv_lora_rank", 512)
        self.qk_nope = j.get("qk_nope_head_dim", 128)
        self.qk_rope = j.get("qk_rope_head_dim", 64)
        self.v_head_dim = j.get("v_head_dim", 128)
        self.rms_norm_eps = j.get("rms_norm_eps", 1e-6)
        self.tie_word_embeddings = j.get("tie_word_embeddings", False)
        self.num_experts = j.get("n_routed_experts", 256 if v3 else 64)
        self.top_k = j["num_experts_per_tok"]
        self.n_shared = j.get("n_shared_experts", 1 if v3 else 2) or 0
        self.n_group = j.get("n_group", 8 if v3 else 1) or 1
        self.topk_group = j.get("topk_group", 4 if v3 else 1) or 1
        self.norm_topk_prob = j.get("norm_topk_prob", True if v3 else False)
        self.routed_scaling_factor = float(j.get("routed_scaling_factor", 2.5 if v3 else 1.0))
        self.first_k_dense_replace = j.get("first_k_dense_replace", 3 if v3 else 0)
        self.moe_layer_freq = j.get("moe_layer_freq", 1)
        self.topk_method = j.get("topk_method", "noaux_tc" if v3 else "greedy")
        self.scoring_func = j.get("scoring_func", "sigmoid" if v3 else "softmax")
        if v3 and (self.topk_method != "noaux_tc" or self.scoring_func != "sigmoid"):
            raise ValueError("DeepSeek-V3 routing is sigmoid + noaux_tc only")
        if not v3 and (self.topk_method not in ("greedy", "group_limited_greedy") or self.scoring_func != "softmax"):
            raise ValueError("DeepSeek-V2 routing is softmax + greedy / group_limited_greedy only")
        self.interleave = j.get("rope_interleave", True) if v3 else True
        # RoPE: rope_theta top level or inside rope_parameters / rope_scaling.
        theta = j.get("rope_theta")
        rope = j.get("rope_parameters") if isinstance(j.get("rope_parameters"), dict) else j.get("rope_scaling")
        self.rope = dict(rope) if isinstance(rope, dict) else {}
        theta = self.rope.get("rope_theta", theta)
        self.rope_theta = 10000.0 if theta is None else float(theta)
        self.rope_type = self.rope.get("rope_type", self.rope.get("type", "default")) or "default"
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type {self.rope_type!r} not supported by this reference")
        self.max_position_embeddings = j.get("max_position_embeddings", 4096 if v3 else 2048)
        q = j.get("quantization_config")
        self.fp8_block = None
        if q:
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"quantization_config {q} not supported by this reference")
            self.fp8_block = tuple(q.get("weight_block_size", (128, 128)))

    def is_moe(self, l):
        return l >= self.first_k_dense_replace and l % self.moe_layer_freq == 0


class Weights:
    """Tensor access; F8_E4M3 weights come back dequantised with their block scales."""

    def __init__(self, cfg, tensors, dtypes):
        self.cfg, self.t, self.dt = cfg, tensors, dtypes
        self.used = set()
        self.fp8_count = 0

    def __call__(self, name):
        self.used.add(name)
        if self.dt.get(name) == "F8_E4M3":
            if self.cfg.fp8_block is None:
                raise ValueError(f"{name} is F8_E4M3 but config.json has no quantization_config")
            sname = name + "_scale_inv"
            self.used.add(sname)
            self.fp8_count += 1
            return dequant_fp8(self.t[name], self.t[sname], self.cfg.fp8_block)
        return self.t[name]


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


class Rope:
    def __init__(self, cfg):
        dim = cfg.qk_rope
        base = cfg.rope_theta
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        self.inv_freq = 1.0 / pos_freqs
        self.attention_factor = 1.0
        self.softmax_mscale = 1.0
        self.interleave = cfg.interleave
        r = cfg.rope
        if cfg.rope_type == "yarn":
            factor = float(r["factor"])
            orig = r.get("original_max_position_embeddings", cfg.max_position_embeddings)
            beta_fast = r.get("beta_fast") or 32.0
            beta_slow = r.get("beta_slow") or 1.0

            def corr(rot):
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(corr(beta_fast)), 0)
            high = min(math.ceil(corr(beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
            self.inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1.0 - ramp)
            self.ramp = ramp
            ms, msa = r.get("mscale"), r.get("mscale_all_dim")
            if r.get("attention_factor") is not None:
                self.attention_factor = float(r["attention_factor"])
            elif ms and msa:
                self.attention_factor = get_mscale(factor, ms) / get_mscale(factor, msa)
            else:
                self.attention_factor = get_mscale(factor)
            if msa:
                self.softmax_mscale = get_mscale(factor, msa)

    def apply(self, x, positions):
        """x [B, S, heads, dim] rotated for positions [S]."""
        ang = np.outer(positions.astype(np.float64), self.inv_freq)  # [S, dim/2]
        cos = (np.cos(ang) * self.attention_factor)[None, :, None, :]
        sin = (np.sin(ang) * self.attention_factor)[None, :, None, :]
        out = np.empty_like(x)
        if self.interleave:
            a, b = x[..., 0::2], x[..., 1::2]  # (a + ib) * (cos + i sin)
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = a * sin + b * cos
        else:
            h = x.shape[-1] // 2
            a, b = x[..., :h], x[..., h:]
            out[..., :h] = a * cos - b * sin
            out[..., h:] = b * cos + a * sin
        return out


class Stats:
    def __init__(self):
        self.min_topk_gap = math.inf  # k-th vs (k+1)-th value of the vector top-k picks from
        self.min_group_gap = math.inf  # topk_group-th vs next group score
        self.routings = 0  # token x MoE layer
        self.bias_changed = 0  # routings whose expert set the correction bias changed
        self.masked_picks = 0  # experts chosen from a dropped group (their choice value was set to 0)


def mla_attention(cfg, W, rope, l, x):
    """x: [B, S, hidden] (already input-normed) -> [B, S, hidden].  K and V expanded per head."""
    p = f"model.layers.{l}.self_attn."
    B, S, _ = x.shape
    nh, dn, dr, dv, r = cfg.num_heads, cfg.qk_nope, cfg.qk_rope, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        qa = rmsnorm(x @ W(p + "q_a_proj.weight").T, W(p + "q_a_layernorm.weight"), cfg.rms_norm_eps)
        q = qa @ W(p + "q_b_proj.weight").T
    else:
        q = x @ W(p + "q_proj.weight").T
    q = q.reshape(B, S, nh, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    kva = x @ W(p + "kv_a_proj_with_mqa.weight").T  # [B, S, r + dr]
    latent = rmsnorm(kva[..., :r], W(p + "kv_a_layernorm.weight"), cfg.rms_norm_eps)
    k_rope = kva[..., r:].reshape(B, S, 1, dr)
    kv = (latent @ W(p + "kv_b_proj.weight").T).reshape(B, S, nh, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    pos = np.arange(S)
    q_rope = rope.apply(q_rope, pos)
    k_rope = rope.apply(k_rope, pos)
    qf = np.concatenate([q_nope, q_rope], axis=-1)  # [B, S, nh, dn + dr]
    kf = np.concatenate([k_nope, np.broadcast_to(k_rope, (B, S, nh, dr))], axis=-1)
    scale = (dn + dr) ** -0.5 * rope.softmax_mscale ** 2
    scores = np.einsum("bshd,bthd->bhst", qf, kf) * scale
    mask = np.triu(np.ones((S, S), dtype=bool), k=1)
    scores = np.where(mask, -np.inf, scores)
    probs = softmax(scores, axis=-1)
    o = np.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, nh * dv)
    return o @ W(p + "o_proj.weight").T


def swiglu(W, prefix, x):
    h = silu(x @ W(prefix + "gate_proj.weight").T) * (x @ W(prefix + "up_proj.weight").T)
    return h @ W(prefix + "down_proj.weight").T


def _topk(v, k):
    """Indices of the k largest per row, largest first, ties to the lower index; and the gap between
    the k-th and (k+1)-th value."""
    order = np.argsort(-v, axis=-1, kind="stable")
    top = order[:, :k]
    gap = math.inf
    if k < v.shape[-1]:
        kth = np.take_along_axis(v, order[:, k - 1:k], axis=-1)
        nxt = np.take_along_axis(v, order[:, k:k + 1], axis=-1)
        gap = float(np.min(kth - nxt))
    return top, gap


def route(cfg, scores, bias, stats):
    """scores [N, E] (sigmoid or softmax) -> (experts [N, k], weights [N, k], dropped-group mask)."""
    N, E = scores.shape
    k, ng, tg = cfg.top_k, cfg.n_group, cfg.topk_group
    per = E // ng
    choice = scores + (bias if bias is not None else 0.0)
    dropped = np.zeros((N, E), dtype=bool)
    if cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
        g = choice.reshape(N, ng, per)
        if cfg.topk_method == "noaux_tc":
            if per < 2:
                raise ValueError("noaux_tc needs at least two experts per group")
            gs = np.sort(g, axis=-1)[..., ::-1][..., :2].sum(axis=-1)
        else:
            gs = g.max(axis=-1)
        keep, ggap = _topk(gs, tg)
        stats.min_group_gap = min(stats.min_group_gap, ggap)
        gmask = np.zeros((N, ng), dtype=bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        dropped = ~np.repeat(gmask, per, axis=-1)
        choice = np.where(dropped, 0.0, choice)
    top, gap = _topk(choice, k)
    stats.min_topk_gap = min(stats.min_topk_gap, gap)
    stats.masked_picks += int(np.count_nonzero(np.take_along_axis(dropped, top, axis=-1)))
    w = np.take_along_axis(scores, top, axis=-1)
    if cfg.v3:
        if cfg.norm_topk_prob:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
    else:
        if cfg.norm_topk_prob and k > 1:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        else:
            w = w * cfg.routed_scaling_factor
    return top, w


def moe_block(cfg, W, l, x, stats):
    p = f"model.layers.{l}.mlp."
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    logits = flat @ W(p + "gate.weight").T  # [N, E]
    if cfg.v3:
        scores = 1.0 / (1.0 + np.exp(-logits))
        bias = W(p + "gate.e_score_correction_bias")
    else:
        scores = softmax(logits, axis=-1)
        bias = None
    top, w = route(cfg, scores, bias, stats)
    stats.routings += flat.shape[0]
    if bias is not None and np.any(bias != 0):
        unbiased, _ = route(cfg, scores, None, Stats())
        stats.bias_changed += int(np.count_nonzero(np.any(np.sort(unbiased, -1) != np.sort(top, -1), axis=-1)))
    out = np.zeros_like(flat)
    for e in range(cfg.num_experts):
        rows, slot = np.nonzero(top == e)
        if rows.size == 0:
            continue
        ye = swiglu(W, f"{p}experts.{e}.", flat[rows])
        np.add.at(out, rows, ye * w[rows, slot][:, None])
    if cfg.n_shared:
        out = out + swiglu(W, p + "shared_experts.", flat)
    return out.reshape(shape)


class Model:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = DeepseekConfig(json.load(f))
        tensors, dtypes = load_checkpoint(model_dir)
        n = self.cfg.num_layers
        self.mtp_ignored = 0
        for name in list(tensors):
            parts = name.split(".")
            if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and int(parts[2]) >= n:
                del tensors[name]
                self.mtp_ignored += 1
        self.W = Weights(self.cfg, tensors, dtypes)
        self.rope = Rope(self.cfg)

    def logits(self, input_ids, stats=None, probe_layer=None):
        cfg, W = self.cfg, self.W
        stats = stats or Stats()
        probe = {}
        x = W("model.embed_tokens.weight")[input_ids]  # [B, S, H]
        for l in range(cfg.num_layers):
            p = f"model.layers.{l}."
            h = rmsnorm(x, W(p + "input_layernorm.weight"), cfg.rms_norm_eps)
            x = x + mla_attention(cfg, W, self.rope, l, h)
            h = rmsnorm(x, W(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
            if cfg.is_moe(l):
                y = moe_block(cfg, W, l, h, stats)
                if l == probe_layer:
                    probe["in"], probe["out"] = h, y
            else:
                y = swiglu(W, p + "mlp.", h)
            x = x + y
        x = rmsnorm(x, W("model.norm.weight"), cfg.rms_norm_eps)
        head = W("model.embed_tokens.weight") if cfg.tie_word_embeddings else W("lm_head.weight")
        return x @ head.T, stats, probe


# ----------------------------------------------------------------------------------------------
# Own checkpoints
# ----------------------------------------------------------------------------------------------


def base_config(kind):
    """kind: 'v2lite', 'v2', 'v3'.  Small shapes; nope != v head dims so a wrong split shows."""
    if kind == "v2lite":  # DeepSeek-V2-Lite: no q LoRA, greedy softmax top-k, yarn with mscale 0.707
        return {
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 24,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 2,
            "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
            "norm_topk_prob": False, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "max_position_embeddings": 64, "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
        }
    if kind == "v2":  # DeepSeek-V2 proper: q LoRA, group-limited greedy, renormalised top-k
        return {
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 20,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
            "n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
            "norm_topk_prob": True, "routed_scaling_factor": 2.0, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "max_position_embeddings": 128, "rope_theta": 10000.0, "rope_scaling": None,
            "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
        }
    if kind == "v3":  # DeepSeek-V3: q LoRA, sigmoid + bias, noaux_tc, yarn (mscale != mscale_all_dim)
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 128, "hidden_size": 160, "intermediate_size": 200, "moe_intermediate_size": 136,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
            "v_head_dim": 24, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
            "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "max_position_embeddings": 128, "rope_interleave": True, "num_nextn_predict_layers": 0,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                                "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale": 1.0, "mscale_all_dim": 0.8},
            "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
        }
    raise ValueError(kind)


def quantize_fp8(w, block, pow2_scales, rng):
    """(codes uint8, scale_inv float32) for a float32 matrix, DeepSeek style: scale = amax / 448 per
    block; or, with pow2_scales, that rounded up to a power of two and multiplied by a random 2^0..2^3
    so that neighbouring blocks get different scales (and small codes, subnormals included, occur)
    while fp8 * scale stays exact in bf16."""
    br, bc = block
    rows, cols = w.shape
    sr, sc = -(-rows // br), -(-cols // bc)
    scales = np.ones((sr, sc), dtype=np.float32)
    for i in range(sr):
        for j in range(sc):
            amax = float(np.max(np.abs(w[i * br:(i + 1) * br, j * bc:(j + 1) * bc])))
            s = np.float32(amax / E4M3_MAX) if amax > 0 else np.float32(1.0)
            if pow2_scales:
                s = np.float32(2.0 ** (math.ceil(math.log2(float(s))) + int(rng.integers(0, 4))))
            scales[i, j] = s
    full = np.repeat(np.repeat(scales.astype(np.float64), br, 0), bc, 1)[:rows, :cols]
    return e4m3fn_encode(w.astype(np.float64) / full), scales


def write_checkpoint(out_dir, config, *, seed, std=0.1, bias_scale=0.5, fp8=None, mtp_layers=0, shards=1):
    """A DeepSeek checkpoint in the hub layout with N(0, std) weights and random norm weights.
    fp8: None, 'amax' (scale = amax/448) or 'pow2' (power-of-two scales): linear layers other than
    the router, embedding and lm_head are stored F8_E4M3 with 128x128 block scales, the rest BF16.
    mtp_layers: extra model.layers.{num_hidden_layers + i}.* tensors (DeepSeek-V3's MTP module)."""
    cfg = DeepseekConfig(config)
    rng = np.random.default_rng(seed)
    H, nh = cfg.hidden_size, cfg.num_heads
    dn, dr, dv, r = cfg.qk_nope, cfg.qk_rope, cfg.v_head_dim, cfg.kv_lora_rank
    t = {}  # name -> (kind, array); kind 'lin' (quantisable), 'mat', 'vec'

    def mat(name, rows, cols, kind="lin"):
        t[name] = (kind, rng.normal(0.0, std, size=(rows, cols)).astype(np.float32))

    def vec(name, n, lo=0.5, hi=1.5):
        t[name] = ("vec", rng.uniform(lo, hi, size=(n,)).astype(np.float32))

    def ffn(prefix, f):
        mat(prefix + "gate_proj.weight", f, H)
        mat(prefix + "up_proj.weight", f, H)
        mat(prefix + "down_proj.weight", H, f)

    mat("model.embed_tokens.weight", cfg.vocab_size, H, "mat")
    for l in range(cfg.num_layers + mtp_layers):
        p = f"model.layers.{l}."
        vec(p + "input_layernorm.weight", H)
        vec(p + "post_attention_layernorm.weight", H)
        a = p + "self_attn."
        if cfg.q_lora_rank:
            mat(a + "q_a_proj.weight", cfg.q_lora_rank, H)
            vec(a + "q_a_layernorm.weight", cfg.q_lora_rank)
            mat(a + "q_b_proj.weight", nh * (dn + dr), cfg.q_lora_rank)
        else:
            mat(a + "q_proj.weight", nh * (dn + dr), H)
        mat(a + "kv_a_proj_with_mqa.weight", r + dr, H)
        vec(a + "kv_a_layernorm.weight", r)
        mat(a + "kv_b_proj.weight", nh * (dn + dv), r)
        mat(a + "o_proj.weight", H, nh * dv)
        m = p + "mlp."
        if cfg.is_moe(l):
            mat(m + "gate.weight", cfg.num_experts, H, "mat")
            if cfg.v3:
                b = rng.uniform(-bias_scale, bias_scale, size=(cfg.num_experts,)).astype(np.float32)
                t[m + "gate.e_score_correction_bias"] = ("f32", b)
            for e in range(cfg.num_experts):
                ffn(f"{m}experts.{e}.", cfg.moe_intermediate_size)
            if cfg.n_shared:
                ffn(m + "shared_experts.", cfg.n_shared * cfg.moe_intermediate_size)
        else:
            ffn(m, cfg.intermediate_size)
        if l >= cfg.num_layers:  # the MTP module's own tensors
            vec(p + "enorm.weight", H)
            vec(p + "hnorm.weight", H)
            mat(p + "eh_proj.weight", H, 2 * H)
            vec(p + "shared_head.norm.weight", H)
            mat(p + "shared_head.head.weight", cfg.vocab_size, H, "mat")
            mat(p + "embed_tokens.weight", cfg.vocab_size, H, "mat")
    vec("model.norm.weight", H)
    if not cfg.tie_word_embeddings:
        mat("lm_head.weight", cfg.vocab_size, H, "mat")

    out = {}
    block = (128, 128)
    for name, (kind, arr) in t.items():
        if kind == "f32":
            out[name] = ("F32", arr)
        elif fp8 and kind == "lin":
            codes, scales = quantize_fp8(arr, block, fp8 == "pow2", rng)
            out[name] = ("F8_E4M3", codes)
            out[name + "_scale_inv"] = ("F32", scales)
        else:
            out[name] = ("BF16" if fp8 else "F32", arr)
    if fp8:
        config = dict(config)
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(block)}
        config["torch_dtype"] = "bfloat16"
    if mtp_layers:
        config = dict(config)
        config["num_nextn_predict_layers"] = mtp_layers

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = sorted(out)
    if shards == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), out)
        return
    # Like the hub's DeepSeek-V3: the MTP layer lives in the last shard of its own.
    n = cfg.num_layers
    is_mtp = [nm.startswith("model.layers.") and int(nm.split(".")[2]) >= n for nm in names]
    main = [nm for nm, m in zip(names, is_mtp) if not m]
    extra = [nm for nm, m in zip(names, is_mtp) if m]
    groups = []
    per = math.ceil(len(main) / (shards - (1 if extra else 0)))
    for s in range(0, len(main), per):
        groups.append(main[s:s + per])
    if extra:
        groups.append(extra)
    weight_map = {}
    for s, chunk in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fname), {nm: out[nm] for nm in chunk})
        weight_map.update({nm: fname for nm in chunk})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def fixture_dirs(args):
    here = os.path.dirname(os.path.abspath(__file__))
    roots = []
    if args.fixtures:
        roots.append(os.path.abspath(args.fixtures))
    roots += [os.path.join(here, "..", "data", "hf-tiny"), "/work/shared/fixtures/hf-tiny"]
    return roots


def find_fixture(args, name):
    for root in fixture_dirs(args):
        d = os.path.join(root, name)
        if os.path.exists(os.path.join(d, "reference.safetensors")):
            return os.path.normpath(d)
    return None


def own_case(kind, edits=None, **kw):
    def build(work, name):
        d = os.path.join(work, name)
        if os.path.exists(d):
            shutil.rmtree(d)
        cfg = base_config(kind)
        cfg.update(edits or {})
        write_checkpoint(d, cfg, **kw)
        return d
    return build


CASES = [
    ("fixture_deepseekv3_e16k4", "transformers-made DeepseekV3ForCausalLM fixture (default rope, interleaved, "
     "q/kv LoRA, sigmoid + bias, n_group 4 / topk_group 2, 1 shared expert)", ("fixture", "deepseekv3_e16k4")),
    ("fixture_deepseekv3_yarn_e16k4", "the same with yarn rope (factor 4, original max 64, mscale 1 / 1)",
     ("fixture", "deepseekv3_yarn_e16k4")),
    ("v2lite", "DeepSeek-V2-Lite-like: deepseek_v2, q_lora_rank null, greedy softmax top-3 of 8, "
     "norm_topk_prob false, routed_scaling_factor 1.0, first_k_dense_replace 1, 2 shared experts, "
     "yarn factor 4 / original max 16 / mscale 0.707 / mscale_all_dim 0.707, 20-token prompts",
     own_case("v2lite", seed=21)),
    ("v2lite_scale2", "v2lite with routed_scaling_factor 2.0 (applied: norm_topk_prob false)",
     own_case("v2lite", {"routed_scaling_factor": 2.0}, seed=22)),
    ("v2_group_limited", "DeepSeek-V2-like: q LoRA, group_limited_greedy (16 experts, n_group 4, topk_group 2, "
     "top-4), norm_topk_prob true so routed_scaling_factor 2.0 is NOT applied, moe_layer_freq 2 (layers 2 MoE, "
     "1 and 3 dense), default rope", own_case("v2", {"moe_layer_freq": 2}, seed=23)),
    ("v2_top1_norm", "DeepSeek-V2-like with top-1 and norm_topk_prob true: no renormalisation, weights scaled "
     "by routed_scaling_factor 2.0", own_case("v2", {"num_experts_per_tok": 1}, seed=24)),
    ("v3", "DeepSeek-V3-like: hidden 160, q LoRA, sigmoid + e_score_correction_bias (uniform +-0.5), noaux_tc "
     "n_group 4 / topk_group 2 / top-4, norm + routed_scaling_factor 2.5, yarn theta 100 factor 2 "
     "(mscale 1 / mscale_all_dim 0.8), interleaved rope", own_case("v3", seed=31)),
    ("v3_no_interleave", "v3 with rope_interleave false (rotate-half on halves)",
     own_case("v3", {"rope_interleave": False}, seed=32)),
    ("v3_fp8_pow2", "v3 with FP8 e4m3 weights and 128x128 power-of-two block scales (ragged: hidden 160, "
     "dense 200, experts 136), other tensors BF16", own_case("v3", seed=33, fp8="pow2")),
    ("v3_fp8", "v3 with FP8 e4m3 weights and DeepSeek-style amax/448 block scales (ragged blocks), "
     "other tensors BF16", own_case("v3", seed=34, fp8="amax")),
    ("v3_yarn_mscale_all_dim_only", "v3 with rope_parameters giving mscale_all_dim 0.8 but no mscale: "
     "transformers' attention factor is then get_mscale(factor) = 0.1*ln(2)+1 (DeepSeek's own code, whose "
     "mscale defaults to 1, gives get_mscale(2, 1) / get_mscale(2, 0.8)); Switchyard follows transformers",
     own_case("v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0,
                                         "original_max_position_embeddings": 64, "mscale_all_dim": 0.8}},
              seed=36)),
    ("v3_mtp", "v3 plus an MTP layer (model.layers.3.*: full layer + enorm, hnorm, eh_proj, shared_head, "
     "embed_tokens) in a shard of its own, num_nextn_predict_layers 1: must be ignored",
     own_case("v3", seed=35, mtp_layers=1, shards=3)),
]


def run(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}")
    return r.stdout


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def switchyard_logits(args, work, name, model_dir, input_path):
    outp = os.path.join(work, f"{name}.logits.safetensors")
    run([args.binary, "logits", "--model", model_dir, "--input", input_path, "--output", outp,
         "--threads", str(args.threads)])
    return read_safetensors(outp)["logits"]


def stats_text(model, stats):
    cfg = model.cfg
    parts = [f"min top-k gap {stats.min_topk_gap:.2e}"]
    if cfg.topk_method != "greedy":
        parts.append(f"min group gap {stats.min_group_gap:.2e}")
    if cfg.v3:
        parts.append(f"bias changed {stats.bias_changed}/{stats.routings} routings")
        parts.append(f"picks from dropped groups {stats.masked_picks}")
    if model.W.fp8_count:
        parts.append(f"{len({n for n in model.W.used if n.endswith('_scale_inv')})} FP8 weights dequantised")
    if model.mtp_ignored:
        parts.append(f"{model.mtp_ignored} MTP tensors ignored")
    return "; ".join(parts)


def bf16_round(x):
    u = f32_to_bf16_bits(np.asarray(x, dtype=np.float32)).astype(np.uint32) << 16
    return u.view(np.float32).astype(np.float64)


def run_case(args, work, name, spec, seed):
    problems = []
    if isinstance(spec, tuple):  # fixture
        d = find_fixture(args, spec[1])
        if d is None:
            return None, f"fixture {spec[1]} not found under {', '.join(fixture_dirs(args))}"
        ref = read_safetensors(os.path.join(d, "reference.safetensors"))
        model = Model(d)
        stats = Stats()
        ours_np, stats, probe = model.logits(ref["input_ids"], stats, probe_layer=1)
        e_ref = rel_err(ours_np, ref["logits"])
        e_moe = rel_err(probe["out"], ref["moe_block_out"])
        e_moe_in = rel_err(probe["in"], ref["moe_block_in"])
        detail = (f"numpy vs transformers logits {e_ref:.3e}, MoE block in {e_moe_in:.3e} / out {e_moe:.3e}")
        for what, e in (("numpy vs transformers logits", e_ref), ("numpy vs transformers MoE block", e_moe)):
            if not np.isfinite(e) or e >= TOLERANCE:
                problems.append(f"{what} {e:.3e} >= {TOLERANCE:g}")
        if not args.reference_only:
            sy = switchyard_logits(args, work, name, d, os.path.join(d, "reference.safetensors"))
            e_sy = rel_err(sy, ours_np)
            e_sy_ref = rel_err(sy, ref["logits"])
            detail = f"switchyard vs numpy {e_sy:.3e}, switchyard vs transformers {e_sy_ref:.3e}, " + detail
            for what, e in (("switchyard vs numpy", e_sy), ("switchyard vs transformers", e_sy_ref)):
                if not np.isfinite(e) or e >= TOLERANCE:
                    problems.append(f"{what} {e:.3e} >= {TOLERANCE:g}")
        detail += "; " + stats_text(model, stats)
    else:
        if args.reference_only:
            return None, "needs the binary (--reference-only)"
        d = spec(work, name)
        model = Model(d)
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, model.cfg.vocab_size, size=(2, 20), dtype=np.int64)
        inp = os.path.join(work, f"{name}.input.safetensors")
        write_safetensors(inp, {"input_ids": ("I64", ids)})
        sy = switchyard_logits(args, work, name, d, inp)
        if any(t == "F8_E4M3" for t in model.W.dt.values()):
            # Switchyard, like transformers' FP8 dequantisation, keeps dequantised FP8 weights as bf16
            # (kv_b_proj excepted: it stays f32 for the absorbed MLA path); compare against the same.
            W0 = model.W

            class Bf16Weights(Weights):
                def __call__(self, n):
                    v = W0(n)
                    fp8 = W0.dt.get(n) == "F8_E4M3" and "kv_b_proj" not in n
                    return bf16_round(v) if fp8 else v

            model.W = Bf16Weights(model.cfg, W0.t, W0.dt)
        ref, stats, _ = model.logits(ids)
        if sy.shape != ref.shape:
            return False, f"shape mismatch: switchyard {sy.shape}, numpy {ref.shape}"
        e = rel_err(sy, ref)
        detail = f"switchyard vs numpy {e:.3e}; " + stats_text(model, stats)
        if not np.isfinite(e) or e >= TOLERANCE:
            problems.append(f"{e:.3e} >= {TOLERANCE:g}")
        if problems and stats.min_topk_gap < 1e-5:
            problems.append("note: a near-tie in top-k routing may explain a float32 vs float64 difference")
    return not problems, detail + ("" if not problems else " -- " + "; ".join(problems))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", help="path to the switchyard executable")
    ap.add_argument("--workdir", help="scratch folder (default: a new temporary folder, removed afterwards)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="switchyard --threads (default 1)")
    ap.add_argument("--fixtures", help="another folder holding the hf-tiny deepseekv3_* fixtures")
    ap.add_argument("--reference-only", action="store_true",
                    help="run no binary: check only numpy against the transformers fixtures")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()

    cases = CASES
    if args.list:
        for name, desc, _ in cases:
            print(f"{name:30s} {desc}")
        return 0
    if not args.binary and not args.reference_only:
        ap.error("--binary is required (or --reference-only)")
    if args.binary:
        args.binary = os.path.abspath(args.binary)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = [w for w in wanted if w not in {c[0] for c in cases}]
        if unknown:
            ap.error(f"unknown case(s): {', '.join(unknown)}")
        cases = [c for c in cases if c[0] in wanted]

    tmp = None
    work = args.workdir
    if not work:
        tmp = tempfile.mkdtemp(prefix="deepseek_ref_")
        work = tmp
    os.makedirs(work, exist_ok=True)
    failed = []
    try:
        for i, (name, desc, spec) in enumerate(cases):
            try:
                ok, detail = run_case(args, work, name, spec, seed=2000 + i)
            except Exception as e:  # noqa: BLE001 - report and go on with the next case
                ok, detail = False, f"error: {e}"
            informational = "[informational]" in desc
            verdict = "SKIP" if ok is None else ("PASS" if ok else ("DIFF" if informational else "FAIL"))
            print(f"{verdict} {name}: {detail}")
            print(f"     ({desc})")
            sys.stdout.flush()
            if ok is False and not informational:
                failed.append(name)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print(f"FAILED: {len(failed)} of {len(cases)} DeepSeek case(s) disagree with the reference: {', '.join(failed)}")
        return 1
    print(f"OK: every checked DeepSeek case matches the float64 reference (tolerance {TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
