"""The summary as the terminal shows it: a few lines after a run, and the estimate of
`plan --estimate`. Simulated figures say so, and whether their cost profile was measured."""

from __future__ import annotations

from typing import Any

SHOWN_STATUSES = ("ok", "interrupted", "engine_failed", "write_failed")


def outcome_lines(summary: dict[str, Any]) -> list[str]:
    """The lines `batchrun run` prints after a job (none for a job that did not start)."""
    if summary.get("status") not in SHOWN_STATUSES or "rows" not in summary:
        return []
    t = summary["tokens"]
    first = summary.get("time_to_first_step_s")
    embeds = summary.get("task") == "embed"
    # An embedding job has no prefix cache: the tokens it did not compute were duplicates'.
    cached = f"duplicate {t['duplicate']:,}" if embeds else f"cached {t['cached']:,}"
    rate = summary["prefix_cache_hit_rate"]
    lines = [
        f"rows: {summary['rows']}  succeeded: {summary['succeeded']}  "
        f"failed: {summary['failed']}",
        f"tokens: prompt {t['prompt']:,}  {cached}  computed "
        f"{t['computed_prompt']:,}  distinct {t['distinct_prompt'] or '-'}  "
        f"completion {t['completion']:,}",
        ("" if rate is None else f"prefix-cache hit rate {rate:.1%}  ")
        + f"wall {summary['wall_time_s']:.1f}s  {summary['tokens_per_s']:,.0f} tok/s"
        + (f"  first engine step at {first:.1f}s" if first is not None else ""),
    ]
    if embeds:
        lines.append(f"embeddings: {summary['rows_per_s']:,.0f} rows/s; "
                     f"{summary['duplicate_rows']:,} duplicate input(s) embedded once "
                     "(no prefix cache: pooling models run without one)")
    if deferred := summary.get("batch", {}).get("deferred_light_prefixes"):
        lines.append(f"order: {deferred} shared prefix(es) found to answer briefly; the "
                     "rest of their rows ran after work that may decode longer")
    if "simulated" in summary:
        lines.append(simulated_line(summary["simulated"]))
    if "estimate" in summary:
        lines.append(estimate_beside_measured_line(summary["estimate"]))
    lines.extend(replica_lines(summary.get("replicas", ())))
    if restarts := summary.get("ray_restarts"):
        lines.append(f"Ray restarted {restarts} time(s): every replica had been lost with "
                     "the Ray node batchrun started; their unfinished rows went to new ones")
    if "engine_log" in summary:
        lines.append(f"engine log: {summary['engine_log']}")
    return lines


def simulated_line(sim: dict[str, Any]) -> str:
    """The sim engine's figures, labelled as what they are."""
    profile = sim["profile"]
    how = "an ASSUMED cost profile" if profile["assumed"] else "a calibrated cost profile"
    return (f"simulated (vLLM's scheduler, no model): {sim['steps']:,} engine steps, "
            f"{sim['prefill_tokens']:,} prefill tokens, {sim['decode_requests']:,} decodes; "
            f"run time {sim['seconds']:,.1f}s by {how}")


def _figure(x: float) -> str:
    return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}"


def estimate_beside_measured_line(estimate: dict[str, Any]) -> str:
    """What the sim predicted before the run, beside what the run measured."""
    measured = estimate["measured"]

    def pair(name: str, key: str, unit: str = "") -> str:
        predicted, actual = estimate[key], measured[key]
        if predicted is None or actual is None:
            return f"{name} {predicted or '?'}{unit} predicted"
        ratio = f" ({actual / predicted:.2f}x)" if predicted else ""
        return (f"{name} {_figure(predicted)}{unit} predicted, {_figure(actual)}{unit} "
                f"measured{ratio}")

    how = "ASSUMED" if (estimate.get("profile") or {}).get("assumed", True) else "calibrated"
    return (f"estimate (simulated before the run; {how} cost profile): "
            + "; ".join((pair("run stage", "run_seconds", " s"),
                         pair("engine steps", "engine_steps"),
                         pair("computed prompt tokens", "computed_prompt"))))


def estimate_lines(estimate: dict[str, Any]) -> list[str]:
    """`plan --estimate`'s lines: the prediction and, for a fleet, its balance."""
    seconds = "?" if estimate["run_seconds"] is None else f"{estimate['run_seconds']:,.1f} s"
    lines = [f"estimate ({estimate['label']}, profile "
             f"{(estimate['profile'] or {}).get('source')}): {estimate['engine_steps']:,} "
             f"engine steps, {estimate['computed_prompt']:,} computed prompt tokens, run "
             f"stage {seconds}"]
    if fleet := estimate.get("replicas"):
        lines.append(f"  {fleet['count']} replicas: busiest {fleet['busiest_s']:,.1f} s, mean "
                     f"{fleet['mean_s']:,.1f} s (busiest/mean {fleet['busiest_over_mean']})")
    return lines


def _where(replica: dict[str, Any]) -> str:
    """Its node's address, and the start of its Ray node's id (nodes may share an address)."""
    node_id = replica.get("node_id", "?")
    return replica["node"] if node_id == "?" else f"{replica['node']} node {node_id[:8]}"


def replica_lines(replicas: list[dict[str, Any]]) -> list[str]:
    return [f"replica {r['replica']} ({_where(r)}): rows {r['rows']:,}  prompt "
            f"{r['prompt_tokens']:,}  computed {r['computed_prompt_tokens']:,}  completion "
            f"{r['completion_tokens']:,}  busy {r['busy_s']:.1f}s"
            + ("" if r["status"] == "ok" else f"  [{r['status']}]") for r in replicas]
