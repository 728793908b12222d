"""Every invalid config raises ValueError naming the field, the value and what is valid."""

import pytest

from ccajax.config import CCAConfig, MHAConfig, MLAConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), r"num_kv_heads=3 must divide num_q_heads=8; valid num_kv_heads: \[1, 2, 4, 8\]"),
    (dict(num_q_heads=0), r"num_q_heads must be a positive int, got 0"),
    (dict(d_model=-4), r"d_model must be a positive int, got -4"),
    (dict(head_dim=15), r"rope_fraction\*head_dim = 1.0\*15 = 15.0 dims, which must be an even integer"),
    (dict(head_dim=12, rope_fraction=0.25), r"0.25\*12 = 3.0 dims"),
    (dict(rope_fraction=1.5), r"rope_fraction must be in \[0, 1\], got 1.5"),
    (dict(rope_theta=0.0), r"rope_theta must be > 0, got 0.0"),
    (dict(conv_kernel_sizes=(2,)), r"conv_kernel_sizes must be two positive ints \(t0, t1\), got \(2,\)"),
    (dict(conv_kernel_sizes=(0, 2)), r"conv_kernel_sizes must be two positive ints"),
    (dict(temperature_form="softplus"), r"temperature_form must be one of \('linear', 'exp'\), got 'softplus'"),
    (dict(head_dim=5, num_kv_heads=1, rope_fraction=0.0), r"num_kv_heads\*head_dim = 1\*5 channels, which must be even"),
    (dict(head_dim=16.0), r"head_dim must be a positive int, got 16.0"),
])
def test_cca_config_errors(kwargs, match):
    fields = dict(d_model=256, num_q_heads=8, num_kv_heads=2, head_dim=16) | kwargs
    with pytest.raises(ValueError, match=match):
        CCAConfig(**fields)


def test_cca_config_derived_fields():
    cfg = CCAConfig(2048, 8, 2, 128, rope_fraction=0.5)
    assert (cfg.group_size, cfg.q_width, cfg.kv_width, cfg.compression, cfg.conv_padding) == (
        4, 1024, 256, 2.0, 2)
    assert CCAConfig.from_compression(2048, 4) == CCAConfig(2048, 4, 4, 128)
    assert CCAConfig.from_compression(2048, 2, num_kv_heads=2).num_kv_heads == 2
    with pytest.raises(ValueError, match=r"d_model=2000 must be a multiple of compression\*head_dim = 2\*128"):
        CCAConfig.from_compression(2000, 2)
    with pytest.raises(ValueError, match="compression must be a positive int"):
        CCAConfig.from_compression(2048, 0)


def test_configs_are_frozen_and_hashable():
    cfg = CCAConfig(64, 4, 2, 16)
    with pytest.raises(AttributeError):
        cfg.d_model = 32
    assert hash(cfg) == hash(CCAConfig(64, 4, 2, 16))


def test_mha_config_errors():
    with pytest.raises(ValueError, match=r"num_kv_heads=5 must divide num_q_heads=16"):
        MHAConfig(2048, 16, 5, 128)
    with pytest.raises(ValueError, match="rope_fraction"):
        MHAConfig(2048, 16, 4, 128, rope_fraction=-0.1)


def test_mla_config_errors():
    with pytest.raises(ValueError, match="kv_lora_rank must be a positive int, got 0"):
        MLAConfig(2048, 16, 0, 128, 64, 128)
    with pytest.raises(ValueError, match=r"q_lora_rank must be an int >= 0"):
        MLAConfig(2048, 16, 512, 128, 64, 128, q_lora_rank=-1)
    with pytest.raises(ValueError, match=r"1.0\*63 = 63.0 dims"):
        MLAConfig(2048, 16, 512, 128, 63, 128)
    lite = MLAConfig.deepseek_v2_lite()
    assert (lite.d_model, lite.num_heads, lite.kv_lora_rank, lite.qk_head_dim) == (2048, 16, 512, 192)
