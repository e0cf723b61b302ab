"""The tolerances of the parity tests are derived in fused_optim/testing.py (shared with
``python -m fused_optim check``); this module re-exports them for the tests."""
from fused_optim.testing import *  # noqa: F401,F403
from fused_optim.testing import EPS32, UPDATE_BOUND, ulp  # noqa: F401
