"""``python -m fused_optim info | check | bench`` (see fused_optim/cli.py)."""
import os
import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "check" and "TRITON_INTERPRET" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            # No GPU: check the Triton kernels in Triton's interpreter on CPU tensors. The variable is read when
            # the kernels are defined, so it must be set before fused_optim.kernels is imported.
            os.environ["TRITON_INTERPRET"] = "1"
    from fused_optim.cli import main
    sys.exit(main())
