"""The output of ``benchmarks/compare_diffusers.py``: its table (text and Markdown), the
issue's targets per step count, the speedup-PSNR plot, the report files, and the merge of
several runs' reports into one.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare_diffusers_runs import TOLERANCE  # noqa: E402

from omnicache.io import atomic_path, atomic_write_text  # noqa: E402


HEAD = ["system", "target", "compute", "wall s", "speedup", "ideal", "PSNR", "SSIM", "acc", "syncs/step", "compile"]


def fmt_row(r, comp):
    tgt = "-" if r["target"] is None else f"{r['target']:.1f}"
    flag = "" if r.get("in_band", True) else "*"
    shared = f" (= {r['shared_with']:.1f})" if r.get("shared_with") is not None else ""
    return [r["system"], tgt + shared, f"{r['compute_fraction']:.3f}{flag}", f"{r['wall_s']:.2f}",
            f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}",
            "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['class_acc']:.3f}",
            f"{r['syncs_per_step']:.1f}", comp.get(r["system"], "-") if r["system"] != "uncached" else
            comp.get("uncached", "-")]


def format_table(block, markdown=False):
    comp = {k: ("ok" if v == "ok" else "no") for k, v in block.get("compile", {}).items()}
    rows = [fmt_row(r, comp) for r in block["rows"]]
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
        lines = [f"{block['steps']} steps (uncached wall {block['reference_wall_s']:.2f} s, acc "
                 f"{block['reference_acc']:.3f})",
                 "  ".join(h.ljust(w) for h, w in zip(HEAD, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for e in block["errors"]:
        lines.append(("- " if markdown else "  ") + f"{e['system']}: {e['error']}")
    return "\n".join(lines)


def targets_check(block):
    """The issue's targets on one step count: OmniCache + correction vs the best other row at
    0.5 and 0.4 (PSNR margin), its class accuracy vs uncached."""
    out = {}
    rows = [r for r in block["rows"] if r["target"] is not None]
    for target in (0.5, 0.4):
        at = [r for r in rows if r["target"] == target]
        omni = [r for r in at if r["system"] == "ours: OmniCache + correction"]
        others = [r for r in at if r["system"] != "ours: OmniCache + correction" and r["in_band"]]
        if not omni or not others:
            continue
        best = max(others, key=lambda r: r["psnr"])
        o = omni[0]
        out[str(target)] = dict(omnicache_psnr=o["psnr"], best_other=best["system"], best_other_psnr=best["psnr"],
                                margin_db=o["psnr"] - best["psnr"], psnr_met=o["psnr"] - best["psnr"] >= 1.0,
                                acc_drop=block["reference_acc"] - o["class_acc"],
                                acc_met=block["reference_acc"] - o["class_acc"] <= 0.02)
    return out


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = list(report["per_steps"].values())
    fig, axes = plt.subplots(1, len(blocks), figsize=(7 * len(blocks), 5.5), squeeze=False)
    markers = {"ours": "o", "diffusers": "s", "cache-dit": "^"}
    # one colour per system across the panels (a system absent from one panel keeps its colour)
    names = sorted({r["system"] for block in blocks for r in block["rows"] if r["system"] != "uncached"})
    cmap = plt.get_cmap("tab20")
    handles = {}
    for ax, block in zip(axes[0], blocks):
        for k, name in enumerate(names):
            pts = [r for r in block["rows"] if r["system"] == name and not math.isinf(r["psnr"])
                   and r.get("shared_with") is None]
            if not pts:
                continue
            handles[name], = ax.plot([r["speedup"] for r in pts], [r["psnr"] for r in pts],
                                     marker=markers.get(pts[0]["family"], "x"), color=cmap(k % 20), label=name,
                                     linestyle="-", linewidth=0.8)
        ax.set_xlabel("measured speedup (uncached wall / wall)")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.set_title(f"Flux digits arena, {block['steps']} steps")
        ax.grid(alpha=0.3)
    axes[0][-1].legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
                       fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write(report, stem):
    import diffusers
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1, default=str))
    v = report["versions"]
    md = ["# Caching systems on the Flux digits arena\n",
          "Commands: " + "; ".join(f"`{c}`" for c in report.get("commands", [report["command"]])),
          f"\n{report['date']}, torch {v['torch']}, diffusers {v['diffusers']}, cache-dit {v['cache_dit']}, "
          f"{report['seconds']:.0f} s. `*`: compute fraction outside ±{TOLERANCE} of the target (nearest reached).\n"]
    for block in report["per_steps"].values():
        md += [f"\n## {block['steps']} steps ({block.get('samples', '?')} samples)\n", format_table(block, markdown=True),
               "", "targets: " + json.dumps(block["targets_check"]), ""]
        c = block.get("cached_step_cost")
        if c:
            pr = f", median of paired rounds {c['paired_ratio']:.3f}" if "paired_ratio" in c else ""
            md += [f"cached-step cost, ours / diffusers FirstBlockCache at the same decisions (same FLOPs: "
                   f"{c['same_flops']}): {c['ratio']:.3f}{pr} over {len(c['ours_walls'])} rounds "
                   f"(target <= 1.05: {'met' if c['met'] else 'not met'})", ""]
        if block.get("compile"):
            md += ["compile errors:"] + [f"- {k}: {v}" for k, v in block["compile"].items() if v != "ok"] + [""]
    md += [f"- skipped: {s['system']}: {s['reason']}" for s in report["skipped"]]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{json,md,png}}")


def merge(paths, stem):
    """One report from several runs (e.g. 28 and 50 steps run as separate processes)."""
    reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    out = dict(reports[0])
    out["per_steps"] = {k: v for r in reports for k, v in r["per_steps"].items()}
    out["commands"] = [r["command"] for r in reports]
    out["runs"] = [dict(command=r["command"], date=r["date"], seconds=r["seconds"], settings=r["settings"])
                   for r in reports]
    out["seconds"] = sum(r["seconds"] for r in reports)
    for block in out["per_steps"].values():  # recomputed: a shared row's band is its own target's
        for r in block["rows"]:
            r["in_band"] = r["target"] is None or abs(r["compute_fraction"] - r["target"]) <= TOLERANCE
        block["targets_check"] = targets_check(block)
    write(out, stem)
    return out
