"""Cost table numbers against values computed by hand for E=2048, d=128 (bf16 KV cache).

Hand computation (E = 2048, d = 128):
  MHA 16:16   4E^2 = 16,777,216 params; KV 2*16*128 = 4096 values/token.
  GQA 16:4    2E^2 + 2*E*4*128 = 8,388,608 + 2,097,152 = 10,485,760; KV 2*4*128 = 1024.
  MLA         wq E*16*(128+64) = 6,291,456; wkv_a E*(512+64) = 1,179,648; kv_norm 512;
              wkv_b 512*16*(128+128) = 2,097,152; wo 16*128*E = 4,194,304 -> 13,763,072; KV 512+64 = 576.
  CCA C=2     latent 1024: linear 4*E*1024 = 8,388,608; conv channels (8+8)*128 = 2048:
              conv0 2*2048 + 2048 = 6,144; conv1 2*16*128*128 + 2048 = 526,336; temp 8
              -> 8,921,096; KV 2*8*128 = 2048.
  CCA C=4     linear 4*E*512 = 4,194,304; channels 1024: conv0 3,072; conv1 2*8*16384 + 1024 = 263,168;
              temp 4 -> 4,460,548; KV 1024.
  CCGQA 8:2   linear E*128*(2*8 + 2*2) = 5,242,880; channels 1280: conv0 3,840;
              conv1 2*10*16384 + 1280 = 328,960; temp 2 -> 5,575,682; KV 2*2*128 = 512 (8x below MHA).
Attention FLOPs at B=1, S=16384, non-causal: 4*S^2*H*d = 4 * 2^28 * 2048 = 2^41 for 16 heads of 128;
CCA C=2 (8 heads) 2^40; C=4 2^39; MLA 2*S^2*16*(192+128) = 2^28 * 10240.
"""

import pytest

from ccajax import CCAConfig, MHAConfig, MLAConfig, costs

S = 16384
HAND = {  # name: (cfg, params, kv values/token, linear weights, non-causal attention FLOPs)
    "MHA 16:16": (MHAConfig(2048, 16, 16, 128), 16_777_216, 4096, 16_777_216, 2**41),
    "GQA 16:4": (MHAConfig(2048, 16, 4, 128), 10_485_760, 1024, 10_485_760, 2**41),
    "MLA": (MLAConfig.deepseek_v2_lite(), 13_763_072, 576, 13_762_560, 2**28 * 10240),
    "CCA C=2": (CCAConfig(2048, 8, 8, 128), 8_921_096, 2048, 8_388_608, 2**40),
    "CCA C=4": (CCAConfig(2048, 4, 4, 128), 4_460_548, 1024, 4_194_304, 2**39),
    "CCGQA 8:2": (CCAConfig(2048, 8, 2, 128), 5_575_682, 512, 5_242_880, 2**40),
}


@pytest.mark.parametrize("name", HAND)
def test_layer_costs_match_hand_values(name):
    cfg, params, kv_values, linear, attn = HAND[name]
    c = costs.layer_cost(cfg, batch=1, seq_len=S, causal=False)
    assert c.params == params
    assert (c.kv_values_per_token, c.kv_bytes_per_token) == (kv_values, 2 * kv_values)
    assert c.projection_flops == 2 * S * linear
    assert c.attention_flops == attn
    assert costs.layer_cost(cfg, batch=1, seq_len=S, causal=True).attention_flops == attn / 2
    assert c.backward_flops == 2 * (c.projection_flops + c.conv_flops) + 2.5 * attn


def test_conv_flops_by_hand():
    # CCGQA 8:2: channels 1280, 2 FLOPs per tap weight: (2 + 2*128) * 1280 * 2 per token.
    c = costs.layer_cost(CCAConfig(2048, 8, 2, 128), batch=2, seq_len=100)
    assert c.conv_flops == 2 * 100 * 1280 * 2 * (2 + 2 * 128)
    assert costs.layer_cost(CCAConfig(2048, 8, 2, 128, use_conv=False), 1, 100).conv_flops == 0
    assert costs.param_count(CCAConfig(2048, 8, 2, 128, use_conv=False, use_key_temperature=False)) == 5_242_880


def test_kv_compression_of_the_paper_pair():
    table = {c.name: c for c in costs.cost_table(costs.standard_configs(), 1, S)}
    assert table["MHA 16:16"].kv_bytes_per_token / table["CCGQA 8:2"].kv_bytes_per_token == 8
    assert table["CCA C=2 (8:8)"].attention_flops * 2 == table["MHA 16:16"].attention_flops


def test_format_cost_table_lists_every_layer():
    text = costs.format_cost_table(costs.cost_table(costs.standard_configs(), 1, S))
    for name in ("MHA 16:16", "GQA 16:4", "MQA 16:1", "MLA r=512", "CCA C=2 (8:8)", "CCA C=4 (4:4)",
                 "CCGQA 8:2", "CCGQA 4:2"):
        assert name in text
    assert "8.0x" in text and "16.78M" in text


def test_cost_errors():
    with pytest.raises(ValueError, match="cfg must be a CCAConfig, MHAConfig or MLAConfig, got str"):
        costs.param_count("mha")
    with pytest.raises(ValueError, match="needs d_model a multiple of head_dim with >= 8 heads"):
        costs.standard_configs(d_model=512, head_dim=128)
