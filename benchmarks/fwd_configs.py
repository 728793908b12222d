"""Named option sets of `attention_fwd` that the forward benchmarks compare (no flags:
importable by every script)."""

HEAD_DIM = 128

CONFIGS = {
    "default": {},
    "late_k": dict(early_k_wait=False),  # the k wait at the top of each step
    "rendezvous": dict(oneway_pingpong=False),  # both warpgroups meet twice per step (mbarriers)
    "per_tile_grid": dict(persistent=False),  # one CTA per tile
    "persistent_grid": dict(persistent=True),  # causal: longest tiles first, snake rounds
    # Persistent grid (non-causal Sk <= 4096 by default): each next tile's q loaded early.
    "prefetch_q": dict(prefetch_q=True),
    "persistent_prefetch_q": dict(persistent=True, prefetch_q=True),
    "stages3": dict(kv_stages=3),
    # Before 2026-12-01 (session 12): mbarriers for turns and slots, Pallas' warpgroup syncs.
    "mbarriers_auto": dict(named_barriers=False, auto_barriers=True),
    "mbarriers": dict(named_barriers=False),
    "auto_barriers": dict(auto_barriers=True),
    # Before 2026-12-02 (session 18): the producer's copies and slot syncs on all four warps.
    "warpgroup_producer": dict(single_warp_producer=False),
}
