"""The config rules: the flat token block, the default and the tuned configs."""

import moe_helpers as mh
from helion_moe import configs

import helion
import torch


def test_the_token_block_is_twice_the_average_pairs_per_expert():
    # (pairs, experts) -> block: 16 rows at most 8 pairs per expert, then doubling, up to 128
    cases = {(8, 256): 16, (64, 8): 16, (65, 8): 32, (128, 8): 32, (4096, 128): 64}
    cases |= {(4097, 128): 128, (32768, 256): 128, (1, 1): 16, (10**6, 8): 128}
    for (pairs, experts), block_t in cases.items():
        assert mh.flat_token_block(pairs, experts) == block_t, (pairs, experts)


def test_half_tails_run_at_128_row_blocks():
    assert [mh.flat_half_tails(block_t) for block_t in (16, 32, 64, 128)] == [False] * 3 + [True]


def test_default_configs_follow_the_pairs_per_expert():
    for dtype in mh.SUPPORTED_DTYPES:
        for pairs, block_t in ((8, 16), (128, 32), (256, 64), (8 * 64, 128)):
            config = mh.default_config("flat", dtype, num_pairs=pairs, K=64, N=64, E=8)
            assert config == mh.FLAT_CONFIGS[dtype][block_t]
            assert config["block_sizes"][0] == block_t
        assert mh.default_config("masked_store", dtype, 8, 64, 64, 8) == mh.DEFAULT_CONFIGS[dtype]


def test_tuned_configs_are_saved_and_then_preferred(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "TUNED_CONFIGS_PATH", tmp_path / "tuned.json")
    tuned = helion.Config(block_sizes=[32, 64, 32], num_warps=4, num_stages=2)
    mh.save_tuned_config(mh.tuned_config_key(torch.bfloat16, 512, 64, 64, 8), tuned)
    assert mh.default_config("flat", torch.bfloat16, 512, 64, 64, 8) == tuned
    other = mh.default_config("flat", torch.bfloat16, 1024, 64, 64, 8)
    assert other == mh.FLAT_CONFIGS[torch.bfloat16][128]


def test_committed_tuned_configs_are_valid_flat_configs():
    for key, config in mh.load_tuned_configs().items():
        block_t, kernel_config = mh.split_token_block(config)
        assert block_t >= 16 and len(kernel_config["block_sizes"]) == 2, key
