"""CPU threading defaults for the policy side, applied before torch is first imported.

A rollout overlaps generation with sandbox executions and env steps. With OpenMP's default
(active) wait policy, torch's idle intra-op threads spin on every core between kernels and starve
those other processes and threads: tiny-model sampling inside the rollout engine measured 25.7
tokens/s with spinning threads against 1,247 tokens/s with passive ones (bench/bench_rollout.py,
2 cores). So unless the user chose a policy, threads wait passively. This only has an effect when
it runs before torch is imported (importing `agents` or `algos` first, as every entry point does).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
