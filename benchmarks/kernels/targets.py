"""The kernel benchmark's results against the kernels' targets, from its --json output.

    python benchmarks/kernels/targets.py results.jsonl

Targets (the kernels issue): at batch 512 with a 4k shared prefix, shared-prefix attention is
>= 10x faster than per-sequence attention, and runs at >= 70% of the HBM roofline (the bytes
it must move at least, over its time, against the device's spec bandwidth). Per
configuration it prints the faster shared kernel (fused or split) and its ratios; the exit
status is 1 when a target configuration misses a target, 2 when none was measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_BATCH, TARGET_PREFIX = 512, 4096
MIN_SPEEDUP, MIN_HBM_PCT = 10.0, 70.0
SHARED = ("fused", "split")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_shared(records: list[dict]) -> list[dict]:
    """Per configuration, the faster of the shared kernels, with the baselines' times."""
    configs: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["batch"], r["prefix"], r["suffix"], r["query_len"], r["groups"])
        configs.setdefault(key, {})[r["impl"]] = r
    rows = []
    for impls in configs.values():
        shared = [impls[name] for name in SHARED if name in impls]
        if shared:
            best = min(shared, key=lambda r: r["ms"])
            rows.append({**best, "other": {n: r["ms"] for n, r in impls.items()}})
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(records: list[dict], out=sys.stdout) -> int:
    rows = best_shared(records)
    if not rows:
        print("no shared-kernel rows measured", file=out)
        return 2
    print(f"{records[0]['device']}, {records[0]['dtype']}, HBM peak "
          f"{records[0]['peak_gbps']:.0f} GB/s", file=out)
    print(f"{'batch':>5} {'prefix':>6} {'suffix':>6} {'q':>2} {'best':<5} {'ms':>8} "
          f"{'vs paged':>8} {'vs sdpa':>8} {'%HBM':>6} {'max|diff|':>9}", file=out)
    for r in rows:
        print(f"{r['batch']:>5} {r['prefix']:>6} {r['suffix']:>6} {r['query_len']:>2} "
              f"{r['impl']:<5} {r['ms']:>8.3f} {fmt(r['vs_paged'], '7.2f')}x "
              f"{fmt(r['vs_sdpa'], '7.2f')}x {r['hbm_pct']:>5.1f}% {r['max_diff']:>9.2e}",
              file=out)
    targets = [r for r in rows if (r["batch"], r["prefix"]) == (TARGET_BATCH, TARGET_PREFIX)]
    if not targets:
        print(f"targets: batch {TARGET_BATCH} x prefix {TARGET_PREFIX} was not measured",
              file=out)
        return 2
    ok = True
    for r in targets:
        fast = r["vs_paged"] >= MIN_SPEEDUP
        full = r["hbm_pct"] >= MIN_HBM_PCT
        ok &= fast and full
        print(f"target batch {TARGET_BATCH} prefix {TARGET_PREFIX} suffix {r['suffix']}: "
              f"{r['impl']} {r['vs_paged']:.2f}x per-sequence paged "
              f"({'met' if fast else 'MISSED'}, >= {MIN_SPEEDUP:.0f}x), "
              f"vs SDPA {fmt(r['vs_sdpa'], '.2f')}x, {r['hbm_pct']:.1f}% of HBM "
              f"({'met' if full else 'MISSED'}, >= {MIN_HBM_PCT:.0f}%)", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(report(load(Path(sys.argv[1]))))
