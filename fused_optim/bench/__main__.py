"""``python -m fused_optim.bench ARGS``: the same as ``python -m fused_optim bench ARGS``."""
import sys

from . import main

sys.exit(main(sys.argv[1:]))
