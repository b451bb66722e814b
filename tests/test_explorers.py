"""The interactive explorers: their controls change what they show."""

import moe_helpers as mh


def test_the_routing_explorer_redraws_for_its_controls():
    explorer = mh.routing_explorer()
    controls = {c.description: c for c in explorer.children if getattr(c, "description", "")}
    assert set(controls) == {"E", "T", "skew", "top-k"}
    assert explorer.result == mh.explore_routing()  # the first render is the default
    skewed = explorer.result
    controls["skew"].value = 0.0
    assert explorer.result.max_over_mean < skewed.max_over_mean / 4
    controls["T"].value = 16  # 32 pairs over 64 experts: most experts get none
    assert explorer.result.empty_experts > 32
    controls["top-k"].value = 8  # 128 pairs
    assert explorer.result.empty_experts < 32
    controls["E"].value = 4  # top-k can no longer exceed E
    assert controls["top-k"].max == 4 and controls["top-k"].value == 4
    assert explorer.result.empty_experts == 0


def test_the_token_block_explorer_redraws_for_its_controls():
    explorer = mh.token_block_explorer()
    controls = {c.description: c for c in explorer.children if getattr(c, "description", "")}
    assert set(controls) == {"pairs/expert", "block_t"}
    assert explorer.result == mh.explore_token_blocks()  # the first render is the default
    default = explorer.result
    # the statistics are those of the drawn loads
    load = mh.expert_load(mh.route_zipf(40 * 16, 16, 0.0, seed=0, device="cpu"), 16)
    assert default == mh.block_stats(load, 32)
    assert default.padding_rows == default.blocks * 32 - 40 * 16
    controls["block_t"].value = 128  # one block per expert, mostly padding
    assert explorer.result.blocks == 16 and explorer.result.weight_reads == 1.0
    assert explorer.result.wasted_work > default.wasted_work
    controls["pairs/expert"].value = 512  # blocks nearly full
    assert explorer.result.wasted_work < 0.2 and explorer.result.weight_reads > 4


def test_the_model_picker_redraws_the_chosen_model():
    explorer = mh.model_table_explorer()
    (picker,) = [c for c in explorer.children if getattr(c, "description", "") == "model"]
    assert list(picker.options) == [model.name for model in mh.MOE_MODELS]
    first = explorer.result
    assert set(first.index.get_level_values("gemm")) == set(mh.GEMMS)
    picker.value = "DeepSeek-V3"
    assert not explorer.result.equals(first)
    assert explorer.result.equals(mh.explore_model_table("DeepSeek-V3"))


def test_the_shape_picker_redraws_the_chosen_shape():
    explorer = mh.benchmarks_explorer()
    (picker,) = [c for c in explorer.children if getattr(c, "description", "") == "shape"]
    assert list(picker.options) == [mh.MIXTRAL_LIKE.name, mh.FINE_GRAINED.name]
    mixtral = explorer.result
    assert "grouped_mm core" in mixtral.index and (mixtral > 0).all()
    picker.value = mh.FINE_GRAINED.name
    assert explorer.result.equals(mh.explore_benchmarks(mh.FINE_GRAINED.name))
    assert not explorer.result.equals(mixtral)
