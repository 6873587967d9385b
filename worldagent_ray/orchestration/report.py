"""The run report: one self-contained HTML file (inline SVG, no JavaScript, no CDN).

It shows reward and success over time (rolling means, with each episode's curriculum phase as
a coloured strip), the learner's curves (loss, reward, policy version; KL and grad norm when
recorded) when the run learned, a summary by phase, the run's config, and one card per task
group with each sample's GIF, a link to its video file, its plan and verdict. All text from
models is HTML-escaped: model output is data.

Ledger rows it reads from ``metrics.jsonl``: ``kind: "episode"`` (the driver's), ``kind:
"event"`` and ``kind: "learner"`` (one per optimizer step:
:meth:`~worldagent_ray.orchestration.run_folder.RunFolder.record_learner_steps`).
"""

from __future__ import annotations

import html
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydantic import ValidationError

from ..schemas import LearnerStep
from .run_folder import RunFolder

DIMS = ("action_following", "temporal_consistency", "object_interaction", "goal_achievement", "physics")
SHORT = {"action_following": "follow", "temporal_consistency": "order", "object_interaction": "objects",
         "goal_achievement": "goal", "physics": "physics"}


def _rolling(xs: Sequence[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _svg_chart(rows: list[dict[str, Any]], events: list[dict[str, Any]], width: int = 760, height: int = 220) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "<p>No scored episodes yet.</p>"
    w = max(4, len(ok) // 12)
    rew = _rolling([r["reward"] for r in ok], w)
    suc = _rolling([1.0 if r["success"] else 0.0 for r in ok], w)
    pad_l, pad_b, pad_t = 40, 28, 10
    iw, ih = width - pad_l - 10, height - pad_b - pad_t
    n = len(ok)

    def pt(i: int, y: float) -> str:
        x = pad_l + (iw * i / max(1, n - 1))
        return f"{x:.1f},{pad_t + ih * (1 - y):.1f}"

    grid = "".join(
        f'<line x1="{pad_l}" x2="{pad_l + iw}" y1="{pad_t + ih * (1 - g):.1f}" y2="{pad_t + ih * (1 - g):.1f}" '
        f'stroke="#e5e7eb"/><text x="{pad_l - 6}" y="{pad_t + ih * (1 - g) + 4:.1f}" font-size="10" '
        f'text-anchor="end" fill="#6b7280">{g:.1f}</text>'
        for g in (0, 0.25, 0.5, 0.75, 1.0)
    )
    # phase of each episode as a coloured strip along the bottom
    colours = {1: "#dbeafe", 2: "#fde68a", 3: "#fecaca"}
    strip = "".join(
        f'<rect x="{pad_l + iw * i / max(1, n):.1f}" y="{pad_t + ih + 4}" width="{iw / max(1, n) + 0.5:.1f}" '
        f'height="6" fill="{colours.get(r["phase"], "#eee")}"/>'
        for i, r in enumerate(ok)
    )
    lines = (
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{" ".join(pt(i, y) for i, y in enumerate(rew))}"/>'
        f'<polyline fill="none" stroke="#16a34a" stroke-width="2" stroke-dasharray="5,3" '
        f'points="{" ".join(pt(i, y) for i, y in enumerate(suc))}"/>'
    )
    legend = (
        f'<text x="{pad_l + 6}" y="{height - 4}" font-size="11" fill="#2563eb">— reward (rolling {w})</text>'
        f'<text x="{pad_l + 170}" y="{height - 4}" font-size="11" fill="#16a34a">- - success rate</text>'
        f'<text x="{pad_l + 300}" y="{height - 4}" font-size="11" fill="#6b7280">strip: phase 1 blue · 2 yellow · 3 red</text>'
    )
    return (f'<svg viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" '
            f'xmlns="http://www.w3.org/2000/svg">{grid}{strip}{lines}{legend}</svg>')


def _svg_series(title: str, xs: Sequence[float], ys: Sequence[float], colour: str, width: int = 250,
                height: int = 150, integer: bool = False) -> str:
    """One small line chart (x: learner step) with its min and max labelled."""
    pad_l, pad_b, pad_t = 58, 22, 18
    iw, ih = width - pad_l - 8, height - pad_b - pad_t
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    x0, x1 = min(xs), max(xs)
    xspan = (x1 - x0) or 1.0

    def pt(x: float, y: float) -> str:
        return f"{pad_l + iw * (x - x0) / xspan:.1f},{pad_t + ih * (1 - (y - lo) / span):.1f}"

    fmt = (lambda v: f"{v:.0f}") if integer else (lambda v: f"{v:.3g}")
    if len(xs) > 1:
        body = (f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                f'points="{" ".join(pt(x, y) for x, y in zip(xs, ys))}"/>')
    else:  # one step: a dot (a polyline of one point is invisible)
        cx, cy = pt(xs[0], ys[0]).split(",")
        body = f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>'
    return (
        f'<svg class="lc" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><text x="{pad_l}" y="12" font-size="12" fill="#111">{html.escape(title)}</text>'
        f'<line x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{pad_t + ih}" stroke="#e5e7eb"/>'
        f'<line x1="{pad_l}" x2="{pad_l + iw}" y1="{pad_t + ih}" y2="{pad_t + ih}" stroke="#e5e7eb"/>'
        f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="10" text-anchor="end" fill="#6b7280">{fmt(hi)}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + ih}" font-size="10" text-anchor="end" fill="#6b7280">{fmt(lo)}</text>'
        f'<text x="{pad_l}" y="{height - 6}" font-size="10" fill="#6b7280">step {x0:.0f}</text>'
        f'<text x="{pad_l + iw}" y="{height - 6}" font-size="10" text-anchor="end" fill="#6b7280">{x1:.0f}</text>'
        f"{body}</svg>"
    )


def _learning_html(rows: Iterable[Mapping[str, Any]]) -> str:
    """Small multiples of the learner's curves, one per recorded quantity ("" without rows)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        try:
            s = LearnerStep.model_validate(r)
        except ValidationError:
            continue  # not a valid learner step: skipped, never fatal to the report
        by_step[s.step] = s.model_dump()  # a resumed learner may repeat a step: the last row wins
    if not by_step:
        return ""
    steps = sorted(by_step)
    charts = []
    for key, title, colour, integer in (("loss", "loss", "#dc2626", False), ("reward_mean", "reward (batch mean)", "#2563eb", False),
                                        ("policy_version", "policy version", "#7c3aed", True),
                                        ("kl", "KL to reference", "#ea580c", False), ("grad_norm", "grad norm", "#0d9488", False),
                                        ("staleness_mean", "staleness (versions)", "#6b7280", False)):
        pts = [(s, float(by_step[s][key])) for s in steps
               if by_step[s].get(key) is not None and math.isfinite(by_step[s][key])]
        if pts:
            charts.append(_svg_series(title, [p[0] for p in pts], [p[1] for p in pts], colour, integer=integer))
    return (f'<section id="learning"><h2>Learning curve</h2><p class="sub">{len(steps)} optimizer steps, '
            f'policy version {by_step[steps[-1]]["policy_version"]} at the end</p>'
            f'<div class="charts">{"".join(charts)}</div></section>')


def _config_html(run: RunFolder) -> str:
    p = run.local / "config.yaml"
    if not p.exists():
        return ""
    return (f'<section id="config"><h2>Run config</h2><details><summary>config.yaml '
            f'({len(p.read_text().splitlines())} lines)</summary><pre>{html.escape(p.read_text())}</pre>'
            f"</details></section>")


def _media_src(uri: str | None, report_dir: Path) -> str | None:
    if not uri:
        return None
    if "://" in uri and not uri.startswith("file://"):
        return uri
    p = Path(uri.removeprefix("file://"))
    try:
        return os.path.relpath(p, report_dir)
    except ValueError:
        return str(p)


def _scores_html(scores: dict[str, float] | None) -> str:
    if not scores:
        return ""
    cells = "".join(
        f'<span class="s" title="{d}"><b>{SHORT[d]}</b><span class="t"><i style="width:{scores[d] * 100:.0f}%"></i>'
        f'</span>{scores[d]:.2f}</span>'
        for d in DIMS if d in scores
    )
    return f'<div class="scores">{cells}</div>'


def _episode_html(r: dict[str, Any], report_dir: Path) -> str:
    e = html.escape
    src = _media_src(r.get("gif"), report_dir)
    img = f'<img src="{e(src)}" alt="episode video" loading="lazy">' if src else '<div class="noimg">no video</div>'
    video = _media_src(r.get("video"), report_dir)
    link = f' · <a class="video" href="{e(video)}">video</a>' if video else ""
    if r["status"] == "failed":
        badge, body = '<span class="b fail">FAILED</span>', f'<p class="err">{e(r.get("failure") or "")}</p>'
    else:
        ok = r["success"]
        badge = f'<span class="b {"ok" if ok else "no"}">{"SUCCESS" if ok else "no success"} · {r["reward"]:.2f}</span>'
        plan = r.get("plan")
        if plan:
            body = "<ol>" + "".join(f"<li>{e(a)}</li>" for a in plan) + "</ol>"
        else:
            body = f'<p class="err">no plan: {e(r.get("plan_error") or "")}</p>'
        body += _scores_html(r.get("scores"))
        if r.get("caption"):
            body += f'<p class="cap">“{e(r["caption"][:300])}”</p>'
    return f'<div class="ep">{img}<div class="meta">{badge} <small>sample {r["sample"]} · v{r.get("policy_version", 0)}{link}</small>{body}</div></div>'


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#111;padding:0 16px}
h1{margin:0 0 4px}h2{margin-top:28px}.sub{color:#6b7280}
table{border-collapse:collapse}td,th{padding:4px 12px;border-bottom:1px solid #e5e7eb;text-align:right}
th:first-child,td:first-child{text-align:left}
.group{border:1px solid #e5e7eb;border-radius:8px;margin:14px 0;padding:10px 12px}
.group h3{margin:0 0 8px;font-size:15px}.ph{font-size:11px;background:#eef2ff;border-radius:4px;padding:1px 6px}
.eps{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.ep{display:flex;gap:8px;background:#fafafa;border-radius:6px;padding:6px}
.ep img,.noimg{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;flex:none;background:#eee}
.noimg{display:flex;align-items:center;justify-content:center;color:#999;font-size:12px}
.meta{font-size:12px;min-width:0}.meta ol{margin:4px 0;padding-left:18px}.cap{color:#374151;font-style:italic;margin:4px 0}
.b{font-weight:600;border-radius:4px;padding:1px 6px;font-size:11px}.ok{background:#dcfce7;color:#166534}
.no{background:#f3f4f6;color:#374151}.fail{background:#fee2e2;color:#991b1b}.err{color:#991b1b;margin:4px 0}
.scores{display:grid;grid-template-columns:1fr;gap:1px;margin-top:4px;max-width:170px}
.s{font-size:10px;display:flex;gap:4px;align-items:center}.s b{width:42px;font-weight:500}
.t{flex:1;height:6px;background:#e5e7eb;border-radius:3px;overflow:hidden}.t i{display:block;height:6px;background:#60a5fa}
.charts{display:flex;flex-wrap:wrap;gap:12px}.lc{border:1px solid #e5e7eb;border-radius:6px;background:#fff}
pre{background:#f9fafb;border:1px solid #e5e7eb;border-radius:6px;padding:8px;font-size:12px;overflow:auto;max-height:480px}
"""


def write_report(run: RunFolder, summary: dict[str, Any], max_groups: int = 120) -> Path:
    rows = [r.model_dump() for r in {r.id: r for r in run.episode_rows()}.values()]  # latest attempt per id
    events = run.events()
    learning = _learning_html(s.model_dump() for s in run.learner_steps())
    out = run.local / "report.html"
    e = html.escape
    groups: "OrderedDict[str, list[dict[str, Any]]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r["task_id"], []).append(r)
    phase_rows = "".join(
        f"<tr><td>{p}</td><td>{d['episodes']}</td><td>{d['failed']}</td><td>{d['success_rate']:.0%}</td>"
        f"<td>{d['mean_reward']:.3f}</td></tr>" for p, d in summary["by_phase"].items()
    )
    promos = "".join(
        f"<li>phase {ev['from']} → {ev['to']} (success {ev['success_rate']:.0%} over {ev['window']})</li>"
        for ev in summary.get("promotions") or []
    ) or "<li>none</li>"
    cards = []
    for tid, rs in list(groups.items())[-max_groups:][::-1]:
        rs = sorted(rs, key=lambda r: r["sample"])
        g = rs[0]
        cards.append(
            f'<div class="group"><h3><span class="ph">phase {g["phase"]}</span> {e(g["goal"])} '
            f'<small class="sub">{e(tid)}</small></h3><div class="eps">'
            + "".join(_episode_html(r, out.parent) for r in rs) + "</div></div>"
        )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>WorldAgent-Ray run {e(run.run_id)}</title>
<style>{CSS}</style></head><body>
<h1>WorldAgent-Ray · {e(run.run_id)}</h1>
<p class="sub">{summary['episodes']} episodes · {summary['failed']} failed · {summary['episodes_per_s']:.2f} episodes/s ·
{summary['elapsed_s']:.0f} s · current phase {summary.get('phase')}</p>
<section id="curve"><h2>Reward and success over time</h2>{_svg_chart(rows, events)}</section>
{learning}
<h2>By phase</h2><table><tr><th>phase</th><th>episodes</th><th>failed</th><th>success</th><th>mean reward</th></tr>
{phase_rows}</table>
<p>Curriculum changes:</p><ul>{promos}</ul>
{_config_html(run)}
<h2>Episodes (newest first)</h2>{''.join(cards)}
</body></html>"""
    out.write_text(doc, encoding="utf-8")
    return out
