"""fastebm's kernels inside other training libraries (``fastebm.integrations.trl``: TRL's GRPOTrainer).

Each integration imports ``fastebm.kernels`` and its own library, never fastebm's trainer
(``.importlinter`` checks it), so using one costs only the kernels.
"""
