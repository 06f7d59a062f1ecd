"""Category-specific refusal control: refusal-token models, categorical steering vectors, probes and low-rank steering.

Modules are flat and each has one job; see the module map in ``README.md``.
"""
