"""Test-wide settings."""

import os

import torch

# Under pytest-xdist each worker is one process on a 2-core machine: give each one thread, or their
# OpenMP thread pools fight over the cores and run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
