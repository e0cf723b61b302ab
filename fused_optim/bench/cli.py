"""``python -m fused_optim bench``: the command line of the benchmark harness.

    python -m fused_optim bench                       # default sweep for this machine, rows saved
    python -m fused_optim bench --quick --no-save     # tiny sizes: a smoke test (CI runs it on the CPU)
    python -m fused_optim bench --optimizer adamw --workload gpt2-small,many-small \\
        --provider torch-fused,triton --dtype fp32,bf16-master --out /tmp/bench
    python -m fused_optim bench --list                # optimizers, providers, workloads, dtypes, byte models

Defaults: the optimizers whose fused_optim class exists; the workloads and providers of this device type
(on a CPU-only machine the CPU providers at CPU sizes; GPU-only ones are listed as unavailable, with the reason);
fp32; on a GPU each configuration timed eagerly and captured in a CUDA graph.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import harness
from .harness import DTYPES, WORKLOADS, TimingPolicy


def _names(values) -> list | None:
    """Repeated and/or comma-separated option values, or None when not given."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fused_optim bench",
        description="Time fused_optim's optimizer steps against torch.optim and others; rows appended as JSON Lines "
                    "to <out>/<device>.jsonl with a bw_fraction plot. See benchmarks/README.md.",
    )
    ap.add_argument("--optimizer", action="append", metavar="NAME[,NAME]",
                    help="optimizers, or 'all' (default: adamw, and lamb and adafactor once their fused_optim "
                         "classes exist)")
    ap.add_argument("--workload", action="append", metavar="NAME[,NAME]",
                    help=f"workloads: {', '.join(WORKLOADS)} (default: those of this device type)")
    ap.add_argument("--provider", action="append", metavar="NAME[,NAME]",
                    help="providers (default: those of this device type; --list names them)")
    ap.add_argument("--dtype", action="append", metavar="NAME[,NAME]",
                    help=f"dtype configurations: {', '.join(DTYPES)} (default: fp32)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    ap.add_argument("--steps", type=int, help="timed steps per configuration, at most (default: 50 on a GPU, 10 on "
                                              "the CPU, 5 with --quick); fewer when a step is slow (--budget)")
    ap.add_argument("--warmup", type=int,
                    help="untimed steps of each rotated param set first (default: 3; 1 on the CPU with --quick)")
    ap.add_argument("--budget", type=float,
                    help="seconds of timed steps per configuration (default: 2; 0.5 with --quick)")
    ap.add_argument("--threads", type=int,
                    help="CPU threads torch uses (torch.set_num_threads; the device name records it; default: "
                         "torch's, 1 with --quick on the CPU)")
    ap.add_argument("--copy-mib", type=int,
                    help="MiB copied to measure the copy bandwidth (default: 1024 on a GPU, 256 on the CPU; a "
                         "quarter or half of that with --quick); keep it several times the last-level cache")
    ap.add_argument("--out", type=Path,
                    help="folder of the JSONL rows and the plot (default: benchmarks/results/ of the checkout "
                         "fused_optim runs from, else the current folder)")
    ap.add_argument("--no-save", action="store_true", help="print only: write no rows and no plot")
    ap.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                    help="also time each configuration captured in a CUDA graph (default on a GPU)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (same tensor counts, narrow shapes), few steps: a smoke test")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")
    ap.add_argument("--list", action="store_true", help="list optimizers, providers, workloads and dtypes; exit")
    ap.add_argument("--replot", action="store_true",
                    help="redraw <out>/<device>.png from <out>/<device>.jsonl (latest row per configuration); exit")
    return ap


class BadArgs(ValueError):
    pass


def _select(given, choices: dict, default: list, what: str):
    if given is None:
        return default
    if given == ["all"]:
        return list(choices.values())
    unknown = [n for n in given if n not in choices]
    if unknown:
        raise BadArgs(f"bench: unknown {what} {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(choices)} (or 'all')")
    return [choices[n] for n in given]


def list_everything(optimizers: dict) -> str:
    lines = ["optimizers (providers; byte model per dtype):"]
    for spec in optimizers.values():
        mark = "" if spec.fused_available() else f"  [fused_optim.{spec.fused_class} not available yet]"
        lines.append(f"  {spec.name}: {spec.describe}{mark}")
        lines.append(f"    providers: {', '.join(p.name for p in spec.providers)}; baseline (x base): "
                     f"{spec.baseline}")
        for cfg in DTYPES.values():
            for label, model in spec.byte_models(cfg):
                lines.append(f"    {cfg.name:12s} {label + ': ' if label else ''}{model.formula()}")
        if len(spec.shape_classes) > 1:
            lines.append("    (a workload's bytes_per_param: these weighted by its tensors' sizes)")
    lines.append("workloads:")
    for wl in WORKLOADS.values():
        shapes = wl.shapes(False)
        n = sum(harness.numel(s) for s in shapes)
        lines.append(f"  {wl.name:11s} {wl.describe}: {n:,} params, {len(shapes)} tensors "
                     f"(devices: {', '.join(wl.devices)})")
    lines.append("dtypes:")
    for cfg in DTYPES.values():
        lines.append(f"  {cfg.name:12s} {cfg.describe}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    """Run the benchmark CLI with ``argv`` (the arguments after ``bench``); returns the exit status: 0, 1 when
    a configuration failed with an error (unavailable ones are not errors), 2 for bad arguments."""
    from . import OPTIMIZERS

    args = parser().parse_args(argv)
    if args.list:
        print(list_everything(OPTIMIZERS))
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and device.type == "cpu":
        # A smoke test on a shared CI machine: torch's multi-threaded CPU kernels wait at every per-tensor barrier
        # for a descheduled thread there (a 674K-param step took 1 s at 2 threads on 2 busy cores, 8 ms at 1).
        torch.set_num_threads(1)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dev_name = harness.device_name(device)
    out = args.out or (harness.repo_root() / "benchmarks" / "results" if harness.repo_root() else Path.cwd())
    jsonl = Path(out) / f"{harness.slug(dev_name)}.jsonl"
    png = jsonl.with_suffix(".png")

    if args.replot:
        if not jsonl.is_file():
            print(f"bench: no rows to plot: {jsonl} does not exist", file=sys.stderr)
            return 2
        why = harness.plot(harness.latest(harness.read_jsonl(jsonl)), png)
        print(f"plot: {png}" if why is None else f"plot: not drawn: {why}")
        return 0 if why is None else 1

    try:
        specs = _select(_names(args.optimizer), OPTIMIZERS,
                        [s for s in OPTIMIZERS.values() if s.default and s.fused_available()], "optimizer")
        workloads = _select(_names(args.workload), WORKLOADS, list(WORKLOADS.values()), "workload")
        dtypes = _select(_names(args.dtype), DTYPES, [DTYPES["fp32"]], "dtype")
    except BadArgs as exc:
        print(exc, file=sys.stderr)
        return 2
    providers = _names(args.provider)
    known = {p.name for s in OPTIMIZERS.values() for p in s.providers}
    if providers and set(providers) - known:
        print(f"bench: unknown provider {', '.join(map(repr, sorted(set(providers) - known)))}; choose from "
              f"{', '.join(sorted(known))}", file=sys.stderr)
        return 2

    cpu = device.type == "cpu"
    graph_modes = [False] + ([True] if not cpu and args.graph is not False else [])
    if cpu and args.graph:
        print("note: --graph applies to CUDA devices only; timing eagerly")
    policy = TimingPolicy(
        warmup=args.warmup if args.warmup is not None else (1 if cpu and args.quick else 3),
        max_steps=args.steps or (5 if args.quick else (10 if cpu else 50)),
        min_steps=3 if args.quick else 5,
        budget_s=args.budget if args.budget is not None else (0.5 if args.quick else 2.0),
    )
    copy_mib = args.copy_mib or ((128 if args.quick else 256) if cpu else (256 if args.quick else 1024))
    copy_bytes = copy_mib * 2**20

    todo, skipped = harness.plan(specs, workloads, dtypes, providers, device, graph_modes, quick=args.quick,
                                 explicit_providers=providers is not None,
                                 explicit_workloads=args.workload is not None)
    print(f"device: {dev_name}")
    if cpu and not torch.cuda.is_available():
        print("no CUDA device: GPU providers and GPU workloads are unavailable (reasons below); timing the CPU "
              "providers at CPU sizes" + (" (--quick: tiny sizes)" if args.quick else ""))
    print(f"{len(todo)} configurations; rows -> {'(not saved)' if args.no_save else jsonl}", flush=True)

    bar = args.progress and sys.stderr.isatty()
    done = [0]

    def on_row(row):
        if not args.no_save:
            harness.append_jsonl(jsonl, [row])
        done[0] += 1
        if not bar:  # a log file: one line per measured configuration, as it comes
            print(f"  {row['optimizer']} {row['workload']} {row['dtype']} {row['provider']}"
                  f"{' graph' if row['graph'] else ''}: {row['ms']:.4g} ms, bw_fraction {row['bw_fraction']:.3f}",
                  flush=True)

    if todo:
        result = harness.run_sweep(todo, device, policy, quick=args.quick, copy_bytes=copy_bytes, on_row=on_row,
                                   progress=bar)
        what = "in-place add" if cpu else "device-to-device copy"
        print(f"copy bandwidth: {result.copy_gbps:.1f} GB/s (read + write; {copy_mib} MiB {what}, median of 20)")
    else:
        result = harness.SweepResult(device=dev_name)
    print(harness.format_table(result.rows) if result.rows else "no configuration ran")
    unavailable = skipped + result.skipped
    if unavailable:
        print("\nunavailable here:")
        for what, why in harness.dedupe(unavailable):
            print(f"  {what}: {why}")
    if result.errors:
        print("\nerrors:")
        for what, why in result.errors:
            print(f"  {what}: {why}")
    print("\nbytes_per_param: " + "; ".join(
        f"{s.name} {c.name} " + ", ".join(f"{m.bytes_per_param}{f' ({label})' if label else ''}"
                                          for label, m in s.byte_models(c))
        for s in specs for c in dtypes))
    if any(len(s.shape_classes) > 1 for s in specs):
        print("(per workload, weighted by its tensors' sizes: the rows' bytes_per_param)")
    if not args.no_save and result.rows:
        why = harness.plot(harness.latest(harness.read_jsonl(jsonl)), png)
        print(f"rows appended to {jsonl}; " + (f"plot: {png}" if why is None else f"plot not drawn: {why}"))
    return 1 if result.errors else 0
