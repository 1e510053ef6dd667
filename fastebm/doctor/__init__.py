"""``fastebm doctor``: what a user runs first on a new machine, and what a bug report pastes.

- ``env.py``: Python, torch, CUDA and driver, the GPU, package versions;
- ``checks.py``: every fast path on this machine's device against its reference, at small shapes;
- ``recipe.py``: with ``--recipe``, the recipe's model and reward paths;
- ``compile_gate.py``: every Triton kernel compiled for sm_80 / sm_90 without a GPU (``--compile``);
- ``costs.py``: the fused loss's cost model per backward strategy (``--costs``).

Layering (.importlinter): beside ``fastebm.train``, below ``fastebm.cli``; it uses the kernels,
the model, the data and the rewards, and nothing imports it but the CLI (and bench/gpu_check.py).
"""
