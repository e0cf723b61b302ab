"""``python -m fused_optim info | check | bench``.

* ``info``: versions, devices, and which backends are usable here (and why not).
* ``check``: every usable fused backend of every optimizer against the reference path, on the parameters of a
  randomly built multi-layer model, for fp32, bf16 and fp16 params (and bf16/fp16 with fp32 master weights);
  prints the worst error of each run next to its derived bound (fused_optim/testing.py) and exits 1 if any run
  exceeds it. Without a GPU, Triton runs in its interpreter on CPU tensors at small sizes. LAMB runs end to end
  (fused and reference never re-aligned; ``--resync`` re-aligns them before every step).
* ``bench``: times the usable backends against torch.optim (fused_optim/bench).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__, backends


# ----------------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------------
def _versions() -> dict:
    out = {"fused_optim": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001  (reported, not raised)
        out["triton"] = f"not importable ({type(exc).__name__})"
    return out


def cmd_info(args) -> int:
    v = _versions()
    print(f"fused_optim {v['fused_optim']}  torch {v['torch']}  triton {v['triton']}  python {v['python']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}  (sm_{cap[0]}{cap[1]})")
    else:
        print("cuda: not available (torch.cuda.is_available() is False)")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    from . import native
    print(f"native extension: {native.info()}")
    print()
    rows = backends.report()
    width = max(len(r["backend"]) for r in rows)
    print(f"{'backend':<{width}}  device  usable  why not")
    for r in rows:
        print(f"{r['backend']:<{width}}  {r['device']:<6}  {'yes' if r['usable'] else 'no':<6}  {r['why']}")
    print()
    auto = {dev: backends.resolve("auto", torch.device(dev), torch.float32, "fp32 params")
            for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])}
    print("backend='auto' picks: " + ", ".join(f"{dev} -> {name}" for dev, name in auto.items()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CheckSpec:
    """One optimizer configuration checked by ``check``: ``run(backend, dtype, master, **common)`` steps it next to
    the reference and returns the list of (what, error, bound) of fused_optim/testing.py. ``options``: the
    command-line options that ``run`` also takes, by keyword (e.g. ``resync``)."""

    name: str
    run: object
    rule: str = "adam"  # the update rule: a backend without it (native: see native.RULES) is skipped
    dtypes: tuple = field(default=(torch.float32, torch.bfloat16, torch.float16))
    options: tuple = ()


def check_specs() -> list:
    from . import FusedAdafactor, FusedAdam, FusedAdamW, FusedLAMB, testing

    def adam(cls, kwargs, l2):
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

        def run(backend, dtype, master, **common):
            r = testing.run_parity(cls, backend, dtype, kwargs, lr=1e-2, master=master, **common)
            return testing.adam_parity_checks(r, dtype, keys, l2, master)
        return run

    def adafactor(kwargs):
        def run(backend, dtype, master, **common):
            return testing.adafactor_parity(FusedAdafactor, backend, dtype, kwargs, master=master, **common)[1]
        return run

    def lamb(groups, max_grad_norm):
        def run(backend, dtype, master, resync=False, **common):
            return testing.lamb_parity(FusedLAMB, backend, dtype, groups, master=master, max_grad_norm=max_grad_norm,
                                       resync=resync, **common)[1]
        return run
    return [
        CheckSpec("adam", adam(FusedAdam, dict(weight_decay=0.01, amsgrad=True), 0.01)),
        CheckSpec("adamw", adam(FusedAdamW, dict(weight_decay=0.1), 0.0)),
        CheckSpec("adafactor", rule="adafactor", run=adafactor(dict(beta1=0.9, weight_decay=0.01))),
        # Two groups, alternating over the model's tensors: adapted with decay, and apex's no-decay group without
        # adaptation; the global grad-norm clip is active at every step (grads up to 100 per element). End to end
        # by default: each step is checked from the gaps that entered it (as tight as the one-step bound) and
        # against the accumulated bound (testing.py, LAMB, "End to end"); --resync for the one-step mode.
        CheckSpec("lamb", rule="lamb", run=lamb((dict(weight_decay=0.01), dict(weight_decay=0.0, layer_adaptation=False)), 1.0),
                  options=("resync",)),
    ]


def model_shapes(rng: torch.Generator, small: bool) -> list:
    """Parameter shapes of a randomly sized transformer-like stack (embeddings, attention, MLP, norms, biases),
    plus a 0-d scalar and a zero-size tensor."""
    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))
    d = pick(16, 40) if small else pick(256, 768)
    vocab = pick(50, 200) if small else pick(8000, 32000)
    shapes = [(vocab, d), (pick(8, 32) if small else 1024, d)]
    for _ in range(pick(2, 3) if small else pick(4, 8)):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,), (), (0,)]
    return shapes


def _fmt(x: float) -> str:
    return f"{x:.2e}" if x else "0"


def cmd_check(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from . import testing  # noqa: F401  (imports torch-only code; kernels are imported by the backends)
    fused = [b for b in ("triton", "native") if backends.unusable(b, device) is None]
    if args.backend:
        fused = [b for b in fused if b in args.backend]
    skipped = {b: backends.unusable(b, device) for b in ("triton", "native") if backends.unusable(b, device)}
    small = device.type == "cpu"
    rng = torch.Generator().manual_seed(args.seed)
    shapes = model_shapes(rng, small)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    scales = [float(10.0 ** torch.empty(()).uniform_(-3, 2, generator=rng)) for _ in shapes]
    print(f"check: {len(shapes)} tensors, {n_params:,} params on {device}, {args.steps} steps "
          f"(steps {testing.BIG_LR_STEPS} at 20x lr), seed {args.seed}")
    for b, why in skipped.items():
        print(f"  {b}: skipped ({why})")
    if not fused:
        print("no fused backend is usable here: nothing to check against the reference")
        return 1
    rows, failed = [], False
    specs = [s for s in check_specs() if not args.optimizer or s.name in args.optimizer]
    for spec in specs:
        for backend in fused:
            why = backends.unusable_for(backend, device, spec.rule)
            if why:
                print(f"  {spec.name:<10} {backend:<8} skipped: {why}")
                continue
            for dtype in spec.dtypes:
                for master in ((False, True) if dtype != torch.float32 else (False,)):
                    if args.dtype and str(dtype).replace("torch.", "") not in args.dtype:
                        continue
                    t0 = time.perf_counter()
                    try:
                        options = {name: getattr(args, name) for name in spec.options}
                        checks = spec.run(backend, dtype, master, shapes=shapes, grad_scales=scales,
                                          device=device, steps=args.steps, seed=args.seed, **options)
                        worst = max(checks, key=lambda c: c[1] / c[2] if c[2] else float("inf"))
                        ok = all(err <= bound for _, err, bound in checks)
                        note = f"{worst[0]}: {_fmt(worst[1])} (bound {_fmt(worst[2])})"
                    except AssertionError as exc:
                        ok, note = False, str(exc)
                    failed |= not ok
                    label = str(dtype).replace("torch.", "") + ("+master" if master else "")
                    rows.append((spec.name, backend, label, "ok" if ok else "FAIL", note,
                                 f"{time.perf_counter() - t0:.1f}s"))
                    print(f"  {rows[-1][0]:<10} {rows[-1][1]:<8} {rows[-1][2]:<16} {rows[-1][3]:<4}  worst {note}"
                          f"  [{rows[-1][5]}]", flush=True)
    print(f"{len(rows)} runs, {sum(r[3] == 'FAIL' for r in rows)} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------------
def cmd_bench(argv: list) -> int:
    try:
        from . import bench
    except ImportError as exc:
        print(f"bench: the benchmark harness is not available in this install ({exc})", file=sys.stderr)
        return 2
    return bench.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the harness parses its own options
        return cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fused_optim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, usable backends and why not")
    p = sub.add_parser("check", help="every usable fused backend against the reference")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", nargs="+", help="only these optimizers (adam, adamw, adafactor, lamb)")
    p.add_argument("--backend", nargs="+", help="only these fused backends (triton, native)")
    p.add_argument("--dtype", nargs="+", help="only these param dtypes (float32, bfloat16, float16)")
    p.add_argument("--resync", action="store_true",
                   help="lamb: copy the fused state into the reference before every step and check each step alone "
                        "(default: end to end, never re-aligned)")
    sub.add_parser("bench", help="time the backends against torch.optim (see `bench --help`)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    return cmd_check(args)
