"""Frozen, validated configurations for CCA/CCGQA and the baseline attentions.

Every invalid field raises ``ValueError`` naming the field, the value and what would be valid, at
construction time, so a bad config never reaches a jitted function.
"""

from __future__ import annotations

import dataclasses

TEMPERATURE_FORMS = ("linear", "exp")


def check_positive_int(name: str, value) -> None:
    """ValueError naming the argument unless value is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_heads(num_q_heads: int, num_kv_heads: int, q_name: str, kv_name: str) -> None:
    check_positive_int(q_name, num_q_heads)
    check_positive_int(kv_name, num_kv_heads)
    if num_q_heads % num_kv_heads:
        valid = [h for h in range(1, num_q_heads + 1) if num_q_heads % h == 0]
        raise ValueError(
            f"{kv_name}={num_kv_heads} must divide {q_name}={num_q_heads}; valid {kv_name}: {valid}"
        )


def _check_rope(head_dim: int, rope_theta: float, rope_fraction: float, dim_name: str) -> None:
    if not 0.0 <= rope_fraction <= 1.0:
        raise ValueError(f"rope_fraction must be in [0, 1], got {rope_fraction!r}")
    if not rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {rope_theta!r}")
    rotary = head_dim * rope_fraction
    if rotary != int(rotary) or int(rotary) % 2:
        raise ValueError(
            f"RoPE rotates rope_fraction*{dim_name} = {rope_fraction}*{head_dim} = {rotary} dims, which "
            f"must be an even integer; use an even {dim_name} or another rope_fraction"
        )


def rotary_dims(head_dim: int, rope_fraction: float) -> int:
    """Number of leading dims of each head that RoPE rotates (even by validation)."""
    return int(head_dim * rope_fraction)


@dataclasses.dataclass(frozen=True)
class CCAConfig:
    """Compressed Convolutional Attention (CCA, ``num_q_heads == num_kv_heads``) or CCGQA.

    Attributes:
      d_model: model width E.
      num_q_heads: latent query heads Hq (CCA: Hq * head_dim = E / C).
      num_kv_heads: latent key/value heads Hkv; must divide Hq. Hkv < Hq is CCGQA.
      head_dim: latent head dim d (even when RoPE is on).
      conv_kernel_sizes: (t0, t1), kernels of the sequence conv and of the per-head channel conv.
      rope_theta: RoPE base. ZAYA1 uses 5e6.
      rope_fraction: fraction of each head's dims that RoPE rotates (1.0 = full; ZAYA1 0.5).
      causal: causal attention mask (decoders). The convolutions and value shift are past-looking
        whatever this says.
      use_conv: convolutional q/k mixing (ablation switch).
      use_qk_mean: add the q-k mean to q and k (ablation switch).
      use_value_shift: half of the value heads come from the previous token (ablation switch); when
        off both value halves come from the current token.
      use_key_temperature: learned per-kv-head key temperature (ablation switch).
      temperature_form: ``"linear"`` (k * temp, as ZAYA1 ships) or ``"exp"`` (k * exp(temp), as the
        paper's listing writes it).
    """

    d_model: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    conv_kernel_sizes: tuple[int, int] = (2, 2)
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0
    causal: bool = True
    use_conv: bool = True
    use_qk_mean: bool = True
    use_value_shift: bool = True
    use_key_temperature: bool = True
    temperature_form: str = "linear"

    def __post_init__(self):
        check_positive_int("d_model", self.d_model)
        _check_heads(self.num_q_heads, self.num_kv_heads, "num_q_heads", "num_kv_heads")
        check_positive_int("head_dim", self.head_dim)
        sizes = tuple(self.conv_kernel_sizes)
        if len(sizes) != 2 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in sizes):
            raise ValueError(
                f"conv_kernel_sizes must be two positive ints (t0, t1), got {self.conv_kernel_sizes!r}"
            )
        object.__setattr__(self, "conv_kernel_sizes", sizes)
        _check_rope(self.head_dim, self.rope_theta, self.rope_fraction, "head_dim")
        if (self.num_kv_heads * self.head_dim) % 2:
            raise ValueError(
                f"the value is built from two halves of num_kv_heads*head_dim = "
                f"{self.num_kv_heads}*{self.head_dim} channels, which must be even"
            )
        if self.temperature_form not in TEMPERATURE_FORMS:
            raise ValueError(
                f"temperature_form must be one of {TEMPERATURE_FORMS}, got {self.temperature_form!r}"
            )

    @property
    def group_size(self) -> int:
        """G = Hq // Hkv, query heads per kv head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        """Hq * d, the latent query width (columns of ``wq``)."""
        return self.num_q_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Hkv * d, the latent key (and value) width (columns of ``wk``)."""
        return self.num_kv_heads * self.head_dim

    @property
    def compression(self) -> float:
        """C = E / (Hq * d)."""
        return self.d_model / self.q_width

    @property
    def conv_padding(self) -> int:
        """Rows of left zero padding before conv0: (t0 - 1) + (t1 - 1); also the decode conv state."""
        t0, t1 = self.conv_kernel_sizes
        return (t0 - 1) + (t1 - 1)

    @classmethod
    def from_compression(cls, d_model: int, compression: int, head_dim: int = 128,
                         num_kv_heads: int | None = None, **kwargs) -> "CCAConfig":
        """CCA with latent width E / C (``num_kv_heads=None``), or CCGQA with fewer kv heads."""
        check_positive_int("compression", compression)
        if d_model % (compression * head_dim):
            raise ValueError(
                f"d_model={d_model} must be a multiple of compression*head_dim = {compression}*{head_dim}"
            )
        num_q_heads = d_model // (compression * head_dim)
        return cls(d_model, num_q_heads, num_kv_heads or num_q_heads, head_dim, **kwargs)


@dataclasses.dataclass(frozen=True)
class MHAConfig:
    """Multi-head attention and its grouped forms: MHA (Hkv == Hq), GQA (Hkv < Hq), MQA (Hkv == 1).

    Attributes:
      d_model: model width E.
      num_q_heads: query heads H.
      num_kv_heads: key/value heads; must divide H.
      head_dim: per-head dim d (commonly E / H).
      rope_theta, rope_fraction: RoPE base and fraction of dims rotated (1.0 = full).
      causal: causal attention mask.
    """

    d_model: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0
    causal: bool = True

    def __post_init__(self):
        check_positive_int("d_model", self.d_model)
        _check_heads(self.num_q_heads, self.num_kv_heads, "num_q_heads", "num_kv_heads")
        check_positive_int("head_dim", self.head_dim)
        _check_rope(self.head_dim, self.rope_theta, self.rope_fraction, "head_dim")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2): low-rank joint KV compression, decoupled RoPE key.

    The defaults of :meth:`deepseek_v2_lite` (E=2048, 16 heads, kv rank 512, rope dim 64) are
    DeepSeek-V2's shape at E=2048.

    Attributes:
      d_model: model width E.
      num_heads: attention heads H.
      kv_lora_rank: width r of the compressed KV latent c_kv (what the cache holds, with the rope key).
      qk_nope_head_dim: per-head q/k dims without position (up-projected from c_kv for keys).
      qk_rope_head_dim: decoupled RoPE dims d_r: per head for q, one shared key of d_r per token.
      v_head_dim: per-head value dim.
      q_lora_rank: rank of the low-rank query path; 0 = a full-rank query projection.
      rope_theta: RoPE base.
      causal: causal attention mask.
      norm_eps: epsilon of the RMSNorms on the latents.
    """

    d_model: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0
    rope_theta: float = 10_000.0
    causal: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("d_model", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.q_lora_rank, bool) or not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank must be an int >= 0 (0 = full-rank queries), got {self.q_lora_rank!r}")
        _check_rope(self.qk_rope_head_dim, self.rope_theta, 1.0, "qk_rope_head_dim")

    @property
    def qk_head_dim(self) -> int:
        """Per-head q/k dim: qk_nope_head_dim + qk_rope_head_dim (192 in DeepSeek-V2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def deepseek_v2_lite(cls, **kwargs) -> "MLAConfig":
        """DeepSeek-V2-Lite's attention: E=2048, 16 heads, r=512, d_nope=128, d_rope=64, d_v=128."""
        fields = dict(d_model=2048, num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128)
        fields.update(kwargs)
        return cls(**fields)


AttentionConfig = CCAConfig | MHAConfig | MLAConfig
