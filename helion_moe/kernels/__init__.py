"""The Helion kernels, one file per schedule: the seed's per-expert kernels (notebook 04), the
flat schedule and the fused gate_up (notebooks 07 and 10), the per-pair kernels for a handful of
pairs (notebooks 07 and 10), the combine of each token's pairs (notebook 08), the backward
(notebook 11), the FP8 ones (notebook 13), and the gated activation they share. Their host-side
callers are the entry points, ``helion_moe.matmul``, ``helion_moe.layer`` and
``helion_moe.fp8``."""
