"""Shared-prefix attention vs per-sequence attention over the same paged KV cache.

For each (batch, prefix, suffix) the batch shares one prefix (or groups of --group-size
sequences share one each), and every sequence has its own suffix of --suffix tokens, the last
--query-len of which are this step's queries (1 = decode). Timed, one layer:

  fused      shared_prefix_attention(mode="fused"): one launch
  split      shared_prefix_attention(mode="split"): prefix + suffix passes + LSE merge
  paged      paged_attention: per-sequence Triton paged attention (GQA heads share K/V loads,
             flash-decoding splits when the batch is small), prefix read once per sequence
  sdpa       torch SDPA over K/V gathered per sequence into dense tensors beforehand (the
             gather is not timed; skipped when the dense copy would not fit)

GB/s counts the bytes each algorithm must move at least (shared: every distinct KV block once;
per-sequence: each sequence's whole KV) plus Q and the output; % HBM is against --peak-gbps
(default: the device's spec sheet, H200 4800, H100 SXM 3350). Needs only torch + triton and a
CUDA GPU:

    python benchmarks/kernels/bench_prefix_attention.py
    python benchmarks/kernels/bench_prefix_attention.py --smoke   # tiny, CPU interpreter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Spec-sheet HBM bandwidth (GB/s) by device name, for the % HBM column; the first match wins.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H800", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
             ("L40S", 864.0), ("L4", 300.0))
DEFAULT_PEAK_GBPS = 3350.0  # H100 SXM


def peak_gbps(device_name: str) -> float:
    return next((gbps for name, gbps in PEAK_GBPS if name in device_name), DEFAULT_PEAK_GBPS)


def import_kernels():
    """The kernels of this checkout as `batchrun_kernels`, without installing anything
    (kernels/ is only named `batchrun_kernels` by the package metadata)."""
    spec = importlib.util.spec_from_file_location(
        "batchrun_kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["batchrun_kernels"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--suffix", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--query-len", type=int, default=1, help="query tokens per sequence")
    parser.add_argument("--group-size", type=int, default=0,
                        help="sequences per shared prefix (0: the whole batch)")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--gqa", type=int, default=8, help="query heads per KV head")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="HBM bandwidth for %% HBM (default: by device name, "
                             f"else {DEFAULT_PEAK_GBPS:.0f})")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every measured row to this file (JSON lines)")
    parser.add_argument("--sdpa-max-gb", type=float, default=None,
                        help="skip SDPA above this dense-KV size (default: 40%% of free memory)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in Triton's interpreter (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.prefix, args.suffix = [4], [64], [16]
        args.head_size, args.num_kv_heads, args.gqa = 32, 2, 2
    return args


def time_ms(fn: Callable[[], object], on_gpu: bool) -> float:
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    start = time.perf_counter()  # smoke mode: one run, only to exercise the code
    fn()
    return (time.perf_counter() - start) * 1e3


def sdpa_inputs(batch, query_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence dense q [B, Hq, query_len, D] and K/V [B, Hkv, L, D] (equal lengths)."""
    from batchrun_kernels.reference import gather_kv

    num_seqs, seq_len = batch.seq_lens.numel(), int(batch.seq_lens[0])
    _, _, num_kv_heads, head_size = batch.k_cache.shape
    k = batch.k_cache.new_empty((num_seqs, seq_len, num_kv_heads, head_size))
    v = torch.empty_like(k)
    for s, row in enumerate(batch.block_table):
        k[s] = gather_kv(batch.k_cache, row, 0, seq_len)
        v[s] = gather_kv(batch.v_cache, row, 0, seq_len)
    q = batch.q.view(num_seqs, query_len, *batch.q.shape[1:]).transpose(1, 2)
    return q, k.transpose(1, 2), v.transpose(1, 2)


def bench_one(args, kernels, num_seqs: int, prefix: int, suffix: int,
              device: str) -> list[dict]:
    from batchrun_kernels.synthetic import GroupSpec, SeqSpec, make_paged_batch

    on_gpu = device == "cuda"
    dtype = DTYPES[args.dtype]
    group_size = args.group_size or num_seqs
    groups = [GroupSpec(prefix, [SeqSpec(suffix, args.query_len)] * min(group_size, num_seqs - i))
              for i in range(0, num_seqs, group_size)]
    batch = make_paged_batch(groups, num_kv_heads=args.num_kv_heads, num_queries_per_kv=args.gqa,
                             head_size=args.head_size, block_size=args.block_size, dtype=dtype,
                             device=device, shuffle=False)
    metadata = batch.metadata()
    tensors, scale = batch.tensors, batch.scale

    token_bytes = 2 * args.num_kv_heads * args.head_size * dtype.itemsize  # K and V
    q_out_bytes = 2 * batch.q.numel() * dtype.itemsize
    shared_bytes = (len(groups) * prefix + num_seqs * suffix) * token_bytes + q_out_bytes
    per_seq_bytes = num_seqs * (prefix + suffix) * token_bytes + q_out_bytes

    num_kv_heads = args.num_kv_heads
    paged_splits = kernels.attention.default_num_splits(
        metadata.seq_tiles.shape[0] * num_kv_heads, metadata.max_seq_len, batch.q.device)
    runs: dict[str, tuple[Callable[[], torch.Tensor], int]] = {
        "fused": (lambda: kernels.shared_prefix_attention(*tensors, metadata, scale,
                                                          mode="fused"), shared_bytes),
        "split": (lambda: kernels.shared_prefix_attention(*tensors, metadata, scale,
                                                          mode="split"), shared_bytes),
        "paged": (lambda: kernels.paged_attention(*tensors, metadata, scale,
                                                  num_splits=paged_splits), per_seq_bytes),
    }
    dense_gb = num_seqs * (prefix + suffix) * token_bytes / 1e9
    budget_gb = args.sdpa_max_gb
    if budget_gb is None:
        budget_gb = 0.4 * torch.cuda.mem_get_info()[0] / 1e9 if on_gpu else 1.0
    if dense_gb <= budget_gb:
        q, k, v = sdpa_inputs(batch, args.query_len)
        causal = None
        if args.query_len > 1:  # bottom-right aligned causal mask over the whole sequence
            pos = torch.arange(k.shape[2], device=device)
            causal = pos[None, :] <= pos[-args.query_len:, None]
        runs["sdpa"] = (lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal, scale=scale, enable_gqa=True), per_seq_bytes)

    print(f"\nbatch={num_seqs} prefix={prefix} suffix={suffix} query_len={args.query_len} "
          f"groups={len(groups)} | bytes: distinct KV {shared_bytes / 1e6:.3g} MB, "
          f"per-sequence KV {per_seq_bytes / 1e6:.3g} MB")
    results = {}
    reference = runs["paged"][0]().float()
    for name, (fn, nbytes) in runs.items():
        out = fn().float()
        if name == "sdpa":  # [B, Hq, q, D] -> [tokens, Hq, D]
            out = out.transpose(1, 2).reshape(reference.shape)
        error = (out - reference).abs().max().item()
        results[name] = (time_ms(fn, on_gpu), nbytes, error)
    if "sdpa" not in runs:
        print(f"  sdpa skipped: dense K/V would take {dense_gb:.1f} GB (> {budget_gb:.1f} GB)")
    print("  (vs X: time of X / time of this; max|diff|: against paged)")
    records = []
    print(f"  {'impl':<6} {'ms':>9} {'GB/s':>9} {'%HBM':>6} {'vs paged':>9} {'vs sdpa':>8}"
          f" {'max|diff|':>10}")
    for name, (ms, nbytes, error) in results.items():
        gbps = nbytes / ms / 1e6
        vs_paged = results["paged"][0] / ms
        vs_sdpa = f"{results['sdpa'][0] / ms:7.2f}x" if "sdpa" in results else f"{'-':>8}"
        print(f"  {name:<6} {ms:9.3f} {gbps:9.1f} {100 * gbps / args.peak_gbps:5.1f}%"
              f" {vs_paged:8.2f}x {vs_sdpa} {error:10.2e}")
        records.append({
            "batch": num_seqs, "prefix": prefix, "suffix": suffix,
            "query_len": args.query_len, "groups": len(groups), "impl": name, "ms": ms,
            "gbps": gbps, "hbm_pct": 100 * gbps / args.peak_gbps, "vs_paged": vs_paged,
            "vs_sdpa": results["sdpa"][0] / ms if "sdpa" in results else None,
            "max_diff": error})
    return records


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        sys.exit("no CUDA device: run on a GPU, or pass --smoke for the CPU interpreter")
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    kernels = import_kernels()
    device = "cuda" if on_gpu else "cpu"
    name = (torch.cuda.get_device_name() if on_gpu
            else "CPU, Triton interpreter (smoke run: the timings mean nothing)")
    if args.peak_gbps is None:
        args.peak_gbps = peak_gbps(name)
    print(f"{name}, {args.dtype}, head_size={args.head_size}, kv_heads={args.num_kv_heads}, "
          f"gqa={args.gqa}, block_size={args.block_size}, peak {args.peak_gbps:.0f} GB/s")
    if args.json:
        args.json.write_text("")
    for num_seqs in args.batch:
        for prefix in args.prefix:
            for suffix in args.suffix:
                records = bench_one(args, kernels, num_seqs, prefix, suffix, device)
                if args.json:  # row by row: a run cut short keeps what it measured
                    with args.json.open("a") as f:
                        for record in records:
                            f.write(json.dumps({"device": name, "dtype": args.dtype,
                                                "peak_gbps": args.peak_gbps, **record}) + "\n")


if __name__ == "__main__":
    main()
