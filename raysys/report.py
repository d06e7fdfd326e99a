"""`raysys report RUN_DIR`: an HTML report with PNG plots of a run, from its machine record.

Reads RUN_DIR/events.jsonl (one JSON object per line; RunRecord in raysys/control/events.py is the
schema) and RUN_DIR/summary.json when present (the summary the `finish` event carries, plus the
agent's account). Writes next to them report.html, which shows the PNGs by relative path:
throughput.png (samples/s and live workers over time, with decisions, rescales, chaos faults and
failures marked), training.png (training loss and held-out results by step), contribution.png (the
final ledger; finished runs only) and epsilon.png (only when a partner trains with differential
privacy). Unknown event types are ignored, so this reads records of newer versions. A run without
a `finish` event (a crash) still renders what it recorded; its tables say "not finished".
Every number shown comes from the record: a missing value reads "n/a", never a guess.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

KNOWN = ("start", "progress", "evaluation", "decision", "rescale", "chaos", "failure",
         "checkpoint", "finish")
MARKED = {"decision": ("black", ":"), "rescale": ("darkgreen", "-"),  # dark: partners use C0-C9
          "chaos": ("darkviolet", "--"), "failure": ("red", "-.")}
NF = "not finished"


class ReportError(ValueError):
    """The run's record cannot be read; the message names the file (and the line)."""


class RunDirError(ReportError):
    """RUN_DIR or its events.jsonl does not exist: a usage error."""


def load_events(path: Path) -> list[dict]:
    """The events of an events.jsonl, in order; blank lines are skipped."""
    events = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise ReportError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ReportError(f"{path} line {n}: expected a JSON object with a 'type' string")
            if event["type"] in KNOWN and not all(
                    isinstance(event.get(k), (int, float)) and not isinstance(event.get(k), bool)
                    for k in ("t", "step")):
                raise ReportError(f"{path} line {n}: a '{event['type']}' event needs numbers "
                                  "'t' and 'step'")
            events.append(event)
    return events


def write_report(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/report.html and its PNGs; returns their paths, report.html first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    events_path = run_dir / "events.jsonl"
    if not events_path.is_file():
        raise RunDirError(f"{events_path}: not found (`raysys run` writes it in the run directory)")
    by: dict[str, list[dict]] = {}
    for event in load_events(events_path):
        by.setdefault(event["type"], []).append(event)
    summary = _load_summary(run_dir / "summary.json", by)
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, always Agg
    except ImportError:
        raise ReportError("raysys report needs matplotlib: pip install matplotlib") from None
    written = []
    for name, draw in (("throughput.png", _plot_throughput), ("training.png", _plot_training),
                       ("contribution.png", _plot_contribution), ("epsilon.png", _plot_epsilon)):
        fig = Figure(layout="constrained")
        if draw(fig, by, summary) is not False:
            fig.savefig(run_dir / name, dpi=100)
            written.append(run_dir / name)
    page = run_dir / "report.html"
    page.write_text(_html(by, summary, [p.name for p in written], run_dir.name), encoding="utf-8")
    return [page, *written]


def _load_summary(path: Path, by: dict) -> dict | None:
    if path.is_file():
        try:
            summary = json.loads(path.read_bytes())
        except ValueError as exc:  # JSONDecodeError (with its line), UnicodeDecodeError
            raise ReportError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise ReportError(f"{path}: expected a JSON object")
        return summary
    finish = by.get("finish")
    return finish[-1].get("summary") if finish and isinstance(finish[-1].get("summary"), dict) \
        else None


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _partners(by: dict, summary: dict | None) -> list[str]:
    names = dict.fromkeys((by.get("start") or [{}])[0].get("partners") or {})
    for e in by.get("progress", []):
        names.update(dict.fromkeys(e.get("workers") or {}))
    names.update(dict.fromkeys((summary or {}).get("partners") or {}))
    return list(names)


def _marks(by: dict) -> list[tuple[float, int, str, str, str]]:
    """(t, step, type, short label for plots, detail for the table) of the marked events."""
    out = []
    for kind in MARKED:
        for e in by.get(kind, []):
            if kind == "decision":
                short = detail = str(e.get("decision", ""))
            elif kind == "rescale":
                short = str(e.get("kind", "rescale"))
                detail = f"{short}: {e.get('detail', '')}; first step at the new size after " \
                         f"{_fmt(e.get('latency_s'), '.2f', ' s')}"
            elif kind == "chaos":
                short = detail = f"{e.get('fault', '?')} {e.get('worker', '?')}"
            else:
                short = detail = f"failed {e.get('worker', '?')}"
            out.append((e["t"], e["step"], kind, short, detail))
    out.sort(key=lambda m: (m[0], m[1]))
    return out


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _plot_throughput(fig, by: dict, summary: dict | None) -> None:
    fig.set_size_inches(12, 7)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    prog, start = by.get("progress", []), (by.get("start") or [{}])[0]
    t = [e["t"] for e in prog]
    rate = [_num(e.get("samples_per_s")) for e in prog]
    top.plot(t, rate, color="black", lw=1.4, marker=".", ms=4, label="samples/s")
    top.set(ylabel="samples/s", title="Throughput and live workers")
    if prog:
        top.set_ylim(0, 1.6 * max([r for r in rate if r == r] or [1]))  # headroom for labels
    else:
        _empty(top, "no progress recorded")
    t_end = max([e["t"] for evs in by.values() for e in evs if e["type"] in KNOWN] or [1])
    times = ([start["t"]] if start.get("partners") else []) + t + [t_end]
    below = [0.0] * len(times)
    for i, p in enumerate(_partners(by, summary)):
        counts = ([_num(start["partners"].get(p, 0))] if start.get("partners") else []) + \
                 [_num((e.get("workers") or {}).get(p, 0)) for e in prog]
        counts.append(counts[-1] if counts else 0.0)
        above = [b + (c if c == c else 0) for b, c in zip(below, counts, strict=True)]
        bottom.fill_between(times, below, above, step="post", color=f"C{i % 10}", alpha=0.6,
                            label=p, lw=0)
        below = above
    bottom.set(xlabel="seconds since the controller started", ylabel="live workers")
    bottom.yaxis.get_major_locator().set_params(integer=True)
    if bottom.get_legend_handles_labels()[0]:  # some partner drawn
        bottom.legend(title="partner", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    bottom.set_xlim(0, t_end * 1.02)
    gap, last_x = 0.016 * t_end, -math.inf
    for n, (tm, _step, kind, short, _) in enumerate(_marks(by), 1):
        color, style = MARKED[kind]
        for ax in (top, bottom):
            ax.axvline(tm, color=color, ls=style, lw=1.1, alpha=0.9)
        last_x = max(tm, last_x + gap)  # nudge a label right of its neighbour, never onto it
        label = f"#{n} " + (short if len(short) <= 18 else short[:17] + "…")
        top.annotate(label, (last_x, 0.98), xycoords=top.get_xaxis_transform(), xytext=(2, 0),
                     textcoords="offset points", rotation=90, ha="left", va="top", fontsize=7.5,
                     color=color, zorder=5, bbox={"fc": "white", "ec": "none", "pad": 0.6,
                                                  "alpha": 0.85})
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", marker=".", label="samples/s")] + [
        Line2D([], [], color=c, ls=s, label=k) for k, (c, s) in MARKED.items() if by.get(k)]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def _plot_training(fig, by: dict, summary: dict | None) -> None:
    fig.set_size_inches(12, 4.5)
    left, right = fig.subplots(1, 2)
    pts = [(e["step"], _num(e.get("loss"))) for e in by.get("progress", [])]
    pts = [(s, v) for s, v in pts if v == v]
    left.plot([s for s, _ in pts], [v for _, v in pts], color="C0", marker=".", ms=4)
    left.set(xlabel="step", ylabel="training loss", title="Training loss (mean of each call)")
    if not pts:
        _empty(left, "no training loss recorded")
    evals = by.get("evaluation", [])
    steps = [e["step"] for e in evals]
    right.plot(steps, [_num(e.get("accuracy")) for e in evals], "o-", color="C2", ms=4,
               label="accuracy")
    right.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.05), title="Held-out data")
    loss_ax = right.twinx()
    loss_ax.plot(steps, [_num(e.get("loss")) for e in evals], "s--", color="C3", ms=4,
                 label="loss")
    loss_ax.set_ylabel("held-out loss")
    held = (summary or {}).get("held_out")
    if isinstance(held, dict):
        at = _num(summary.get("steps"))
        right.plot([at], [_num(held.get("accuracy"))], "*", color="C2", ms=13, mec="black",
                   label="final accuracy")
        loss_ax.plot([at], [_num(held.get("loss"))], "*", color="C3", ms=13, mec="black",
                     label="final loss")
    elif not evals:
        _empty(right, "no held-out evaluation recorded")
    last = max([s for s, _ in pts] + steps + [_num((summary or {}).get("steps"))], default=0)
    for ax in (left, right):  # one step axis for both panels
        ax.set_xlim(0, (last if last == last and last > 0 else 1) * 1.03)
    handles = right.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    if handles:
        right.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=8)


def _plot_contribution(fig, by: dict, summary: dict | None) -> bool:
    ledger = (summary or {}).get("partners")
    if not isinstance(ledger, dict) or not ledger:
        return False
    fig.set_size_inches(12, 6)
    ledger = {p: e if isinstance(e, dict) else {} for p, e in ledger.items()}
    names = list(ledger)
    panels = (("samples", "samples", 1, "{:,.0f}"), ("compute_s", "compute seconds", 1, "{:,.1f}"),
              ("bytes_exchanged", "MiB exchanged (job-wide)", 2 ** 20, "{:,.1f}"),
              ("bytes_within_partner", "MiB within partner", 2 ** 20, "{:,.1f}"),
              ("steps_participated", "steps participated", 1, "{:,.0f}"),
              ("skipped_steps", "steps skipped", 1, "{:,.0f}"))
    for ax, (key, title, scale, fmt) in zip(fig.subplots(2, 3).flat, panels, strict=True):
        values = [_num(ledger[p].get(key)) / scale for p in names]
        ax.bar_label(ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(names))]),
                     fmt=fmt, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.18)
        if not any(v > 0 for v in values):  # e.g. bytes within partner under allreduce
            ax.set(ylim=(0, 1), yticks=[])
        ax.set_ylim(bottom=0)
    fig.suptitle("Contribution by partner (final ledger)")
    return True


def _plot_epsilon(fig, by: dict, summary: dict | None) -> bool:
    series: dict[str, list[tuple[int, float]]] = {}
    for e in by.get("progress", []):
        for p, eps in (e.get("epsilon") or {}).items():
            if _num(eps) == _num(eps):
                series.setdefault(p, []).append((e["step"], float(eps)))
    if not series:
        return False
    fig.set_size_inches(10, 4.5)
    ax = fig.subplots()
    ledger = (summary or {}).get("partners") or {}
    order = _partners(by, summary)
    for p, pts in series.items():
        color = f"C{order.index(p) % 10}" if p in order else None
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", ms=4, color=color, label=p)
        spent = (ledger.get(p) or {}).get("budget_spent_at_step")
        if isinstance(spent, int):
            ax.axvline(spent, color=color, ls="--", lw=1,
                       label=f"{p}: budget spent at step {spent}")
    ax.set(xlabel="step", ylabel="epsilon spent", title="Differential privacy: epsilon by step")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return True


def _fmt(v, spec: str = "", unit: str = "") -> str:
    return f"{v:{spec}}{unit}" if _num(v) == _num(v) else "n/a"


def _table(head: list[str] | None, rows: list[list[str]]) -> str:
    cells = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table>{cells}{body}</table>"


def _html(by: dict, summary: dict | None, pngs: list[str], dir_name: str) -> str:
    start = (by.get("start") or [{}])[0]
    s, done = summary or {}, summary is not None
    job = str(s.get("job") or start.get("job") or dir_name)
    prog = by.get("progress", [])
    last = max([e["step"] for evs in by.values() for e in evs if e["type"] in KNOWN] or [0])
    held = s.get("held_out") if isinstance(s.get("held_out"), dict) else None
    agent = s.get("agent") if isinstance(s.get("agent"), dict) else None
    def val(key: str, spec: str = "", unit: str = "") -> str:
        return _fmt(s.get(key), spec, unit) if done else NF

    no_held = "no held-out evaluation" if done else NF
    rows = [
        ["State", s.get("state", "finished") if done else f"{NF} (no finish event)"],
        ["Steps", f"{val('steps', ',')} of {_fmt(start.get('steps'), ',')}" if done
         else f"{last:,} of {_fmt(start.get('steps'), ',')} recorded ({NF})"],
        ["Stop reason", s.get("stop_reason") or "n/a" if done else NF],
        ["Aggregation", start.get("aggregation", "n/a")],
        ["Final training loss", val("final_loss", ".4f")],
        ["Held-out accuracy", _fmt(held.get("accuracy"), ".2%") if held else no_held],
        ["Held-out loss (rows)", f"{_fmt(held.get('loss'), '.4f')} ({_fmt(held.get('rows'), ',')})"
         if held else no_held],
        ["Wall time", val("wall_time_s", ".1f", " s")],
        ["Training time", val("training_time_s", ".1f", " s")],
        ["Samples/s", val("samples_per_s", ",.1f") if done or not prog else
         f"{_fmt(prog[-1].get('samples_per_s'), ',.1f')} at the last progress ({NF})"],
        ["Rescales", val("rescales") if done else f"{len(by.get('rescale', []))} recorded ({NF})"],
    ]
    if s.get("resumed_from_step") is not None:
        rows.append(["Resumed from step", _fmt(s["resumed_from_step"], ",")])
    if agent:
        rows.append(["Agent", f"{agent.get('policy', 'n/a')}, "
                              f"{len(agent.get('decisions') or [])} decisions applied"])
    for w in list(s.get("data_warnings") or []) + list((agent or {}).get("warnings") or []):
        rows.append(["Warning", w])
    ledger = s.get("partners") if isinstance(s.get("partners"), dict) else {}
    ledger = {p: e for p, e in ledger.items() if isinstance(e, dict)}
    lrows = [[p, _fmt(e.get("samples"), ","), _fmt(e.get("steps_participated"), ","),
              _fmt(e.get("skipped_steps"), ","), _fmt(e.get("failures")),
              _fmt(e.get("compute_s"), ",.1f"),
              _fmt(_num(e.get("bytes_exchanged")) / 2 ** 20, ",.2f"),
              _fmt(_num(e.get("bytes_within_partner")) / 2 ** 20, ",.2f"),
              _fmt(e.get("epsilon"), ".3f") if e.get("epsilon") is not None else "no DP",
              _fmt(e.get("budget_spent_at_step"), ",") if e.get("budget_spent_at_step")
              is not None else "-"] for p, e in ledger.items()]
    marks = [[str(n), f"{t:.1f}", f"{step:,}", kind, detail]
             for n, (t, step, kind, _, detail) in enumerate(_marks(by), 1)]
    imgs = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"></figure>'
                   for p in pngs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raysys report: {html.escape(job)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1250px}}
table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left}}th{{background:#eee}}img{{max-width:100%}}.nf{{color:#a40}}</style></head><body>
<h1>raysys report: {html.escape(job)}</h1>
{'' if done else f'<p class="nf">The run is {NF}: no finish event and no summary.json; '
                 'tables and plots show what its events recorded.</p>'}
<h2>Summary</h2>{_table(None, rows)}
<h2>Contribution ledger</h2>
{_table(["Partner", "Samples", "Steps", "Skipped", "Failures", "Compute s", "MiB exchanged",
         "MiB within partner", "Epsilon", "Budget spent at step"], lrows) if lrows
 else f'<p class="nf">{NF}: the ledger is in the final summary.</p>'}
<h2>Decisions, rescales, chaos and failures</h2>
{_table(["#", "Time (s)", "Step", "Event", "Detail"], marks) if marks else "<p>none</p>"}
<h2>Plots</h2>{imgs}
</body></html>
"""
