"""The Helion kernels, one file per schedule: the seed's per-expert kernels (notebook 04), the
flat schedule and the fused gate_up (notebooks 06 and 09), the per-pair kernels for a handful of
pairs (notebooks 06 and 09), the backward (notebook 10), and the gated activation they share.
Their host-side callers are the entry points, ``helion_moe.matmul`` and ``helion_moe.layer``."""
