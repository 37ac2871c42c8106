"""Quickstart: build SLA2 attention, compare it with dense attention, print error, sparsity and timing.

    python -m experiments.quickstart                       # small CPU-friendly default
    python -m experiments.quickstart --seq-len 32760 --heads 12 --head-dim 128 --sparsity 0.95   # wan-1.3b, GPU

The code is `sla2_jax.quickstart` (it ships with the library: the `sla2-quickstart` command of an installed wheel).
"""

from __future__ import annotations

from sla2_jax.quickstart import main, rel_err  # noqa: F401

if __name__ == "__main__":
    main()
