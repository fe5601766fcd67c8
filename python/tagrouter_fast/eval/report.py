"""Markdown table (paper Table 2 layout) and AR-vs-ratio plot of an evaluation result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "plot_curves", "summary_table"]


def _f(x: Any, scale: float = 1.0, nd: int = 2) -> str:
    if x is None:
        return "-"
    try:
        if x != x:  # NaN
            return "-"
    except TypeError:
        return "-"
    return f"{x * scale:.{nd}f}"


def _pm(entry: dict[str, Any], key: str, scale: float = 100.0, nd: int = 2) -> str:
    v = entry.get(key)
    s = entry.get(f"{key}_std")
    if v is None:
        return "-"
    return f"{_f(v, scale, nd)} ± {_f(s, scale, nd)}" if s is not None else _f(v, scale, nd)


def markdown_table(result: dict[str, Any]) -> str:
    """Render the methods of a result dictionary as a markdown table.

    Columns: performance at the method's operating point (AR %, Uplift %, Cost in USD per 1k
    queries, relative cost, Rank), then AUC %, PAUC %, APGR, CPT(50%) %, AIQ %, the rank
    correlation of the router's preference with the realized gain of M_LLM, and the paired
    AUC/PAUC difference to the best baseline with its 95% bootstrap interval (points).
    """
    methods = result["methods"]
    head = (
        "| Method | AR (%) | Uplift (%) | Cost ($/1k q) | Rel. cost | Rank | AUC (%) | PAUC (%) "
        "| APGR | CPT50 (%) | AIQ (%) | Gain corr | ΔAUC vs best baseline [95% CI] "
        "| ΔPAUC [95% CI] |"
    )
    lines = [head, "|" + "---|" * 14]
    for name, e in methods.items():
        d = e.get("delta_auc_vs_best_baseline")
        dp = e.get("delta_pauc_vs_best_baseline")
        dcell = (
            f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
            if d
            else "-"
        )
        dpcell = (
            f"{100 * dp['mean']:+.2f} [{100 * dp['ci95'][0]:+.2f}, {100 * dp['ci95'][1]:+.2f}]"
            if dp
            else "-"
        )
        lines.append(
            f"| {name} | {_pm(e, 'ar')} | {_f(e.get('uplift'), 1, 1)} "
            f"| {_f(e.get('cost'), 1000, 3)} "
            f"| {_f(e.get('relative_cost'), 1, 3)} | {_f(e.get('rank'), 1, 3)} | {_pm(e, 'auc')} "
            f"| {_pm(e, 'pauc')} | {_f(e.get('apgr'), 1, 3)} | {_f(e.get('cpt50'), 100, 1)} "
            f"| {_f(e.get('aiq'), 100, 2)} | {_f(e.get('gain_corr'), 1, 3)} | {dcell} "
            f"| {dpcell} |"
        )
    vs_paper = [(n, e) for n, e in methods.items() if e.get("delta_auc_vs_paper")]
    if vs_paper:
        lines += [
            "",
            "| Ours vs the paper's TagRouter (paired) | ΔAUC [95% CI] | ΔPAUC [95% CI] |",
            "|---|---|---|",
        ]
        for name, e in vs_paper:
            a, p = e["delta_auc_vs_paper"], e["delta_pauc_vs_paper"]
            lines.append(
                f"| {name} | {100 * a['mean']:+.2f} [{100 * a['ci95'][0]:+.2f}, "
                f"{100 * a['ci95'][1]:+.2f}] | {100 * p['mean']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
                f"{100 * p['ci95'][1]:+.2f}] |"
            )
    vs_ref = [(n, e) for n, e in methods.items() if e.get("delta_auc_vs_reference")]
    if vs_ref:
        lines += [
            "",
            "| Method vs its reference (paired) | reference | ΔAUC [95% CI] | ΔPAUC [95% CI] |",
            "|---|---|---|---|",
        ]
        for name, e in vs_ref:
            a, p = e["delta_auc_vs_reference"], e["delta_pauc_vs_reference"]
            lines.append(
                f"| {name} | {a['baseline']} | {100 * a['mean']:+.2f} [{100 * a['ci95'][0]:+.2f}, "
                f"{100 * a['ci95'][1]:+.2f}] | {100 * p['mean']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
                f"{100 * p['ci95'][1]:+.2f}] |"
            )
    best = result.get("best_baseline")
    lines.append("")
    lines.append(
        f"Pool {result.get('pool') or ','.join(result['models'])}, M_LLM = {result['llm']}, "
        f"{result['folds']} folds x seeds {result.get('seeds')}, "
        f"{result.get('n_queries')} queries; "
        f"best baseline (by mean AUC): {best}."
    )
    return "\n".join(lines)


def _ci(d: dict[str, Any] | None, bold: bool = True) -> str:
    if not d:
        return "-"
    cell = f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
    return f"**{cell}**" if bold and d["ci95"][0] > 0 else cell


def summary_table(results: list[dict[str, Any]]) -> str:
    """One row per pool (the README's table): AUC differences, paired against the pool's best
    baseline and against the paper's TagRouter, with 95% bootstrap intervals (bold: above 0),
    then each TagRouter's operating point (AR %, relative cost) at its own theta."""
    tr = ["TagRouter", "TagRouter+", "Blend(TagRouter+, MF)"]
    head = (
        "| pool (best baseline, its AUC %) | TagRouter (paper) vs best | TagRouter+ vs best "
        "| Blend(TagRouter+, MF) vs best | TagRouter+ vs paper | oracle vs best "
        "| AR % / rel. cost: M_LLM, TagRouter, TagRouter-theta*, TagRouter+ |"
    )
    lines = [head, "|" + " --- |" * 7]
    for r in results:
        m = r["methods"]
        best = r.get("best_baseline")
        b_auc = m[best]["auc"] if best in m else None
        cells = [_ci(m.get(n, {}).get("delta_auc_vs_best_baseline")) for n in tr]
        plus_vs = m.get("TagRouter+", {}).get("delta_auc_vs_paper")
        orc = m.get("oracle", {}).get("delta_auc_vs_best_baseline")
        ops = []
        for n in (r["llm"], "TagRouter", "TagRouter-theta*", "TagRouter+"):
            e = m.get(n)
            ops.append(f"{_f(e.get('ar'), 100)} / {_f(e.get('relative_cost'), 1, 2)}" if e else "-")
        lines.append(
            f"| {r.get('pool') or ','.join(r['models'])} ({best}, {_f(b_auc, 100)}) | "
            + " | ".join(cells)
            + f" | {_ci(plus_vs)} | {_f(orc['mean'], 100, 2) if orc else '-'} | "
            + "; ".join(ops)
            + " |"
        )
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], path: str | Path) -> None:
    """Save a PNG of the mean AR-vs-ratio curve of every method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, e in result["methods"].items():
        c = e.get("curve")
        if c is not None:
            style = (
                "-"
                if e.get("kind") == "tagrouter"
                else ("--" if e.get("kind") == "baseline" else ":")
            )
            ax.plot(
                c["ratio"],
                [100 * y for y in c["ar"]],
                style,
                label=name,
                lw=1.8 if style == "-" else 1.1,
            )
        elif e.get("ratio") is not None and e.get("kind") == "model":
            ax.scatter([e["ratio"]], [100 * e["ar"]], marker="x", s=30)
            ax.annotate(name, (e["ratio"], 100 * e["ar"]), fontsize=7)
    ax.set_xlabel(f"ratio of queries routed to {result['llm']}")
    ax.set_ylabel("accept rate AR (%)")
    ax.set_title(
        f"{result.get('pool') or 'pool'}: AR vs ratio to M_LLM ({result['folds']}-fold CV mean)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
