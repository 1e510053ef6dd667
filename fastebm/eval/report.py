"""``fastebm report RUN_DIR [--out DIR]``: a run's curves and evaluation results in one static HTML page.

From ``RUN_DIR/metrics.jsonl`` (the trainer's, GRPO or SFT), one PNG (matplotlib) per curve that the
run logged: every reward (``reward/<name>``, with its mean within-group std as a band), the total
reward, the KL, the loss, the completion length, the per-phase step time (rollout, score, update
and the whole step in one plot), the learning rate and the gradient norm. Evaluation results found
under RUN_DIR (``metrics.json`` of ``eval auto`` or ``eval videoqa``, ``judge.json``,
``pairwise.json``, at most three folders deep) become tables. Everything goes to ``DIR`` (default
``RUN_DIR/report``): ``index.html`` and the PNGs it shows, so the folder can be copied anywhere.

``fastebm train`` and ``fastebm sft`` write this report at the end of a run.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Optional, Sequence

PHASES = ("time/rollout_s", "time/score_s", "time/update_s", "time/step_s")
CURVES = [("reward/total", "total reward"), ("kl", "KL to the reference"), ("loss", "loss"),
          ("completion/mean_len", "completion length (tokens)"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm")]
EVAL_FILES = ("metrics.json", "judge.json", "pairwise.json")
_SUFFIXES = ("_std", "_errors")


def read_metrics_rows(run_dir: str) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (a line cut by a crash is skipped); [] without the file."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(float(r["step"]))
            ys.append(float(v))
        elif key in r and v is None:  # a non-finite value was logged as null
            xs.append(float(r["step"]))
            ys.append(math.nan)
    return xs, ys


def reward_names(rows: Sequence[dict]) -> list[str]:
    names = {k[len("reward/"):] for r in rows for k in r if k.startswith("reward/")}
    return sorted(n for n in names if n != "total" and not n.endswith(_SUFFIXES))


def plot_curves(rows: Sequence[dict], out_dir: str) -> list[tuple[str, str]]:
    """Write the PNGs; returns ``(file name, title)`` of each, in page order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        made.append((name, title))

    def one(keys_labels: Sequence[tuple[str, str]], name: str, title: str, band: Optional[str] = None) -> None:
        series = [(label, *_series(rows, k)) for k, label in keys_labels]
        series = [s for s in series if s[1]]
        if not series:
            return
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
        if band is not None:
            bx, bs = _series(rows, band)
            if bx and len(bx) == len(series[0][1]):
                import numpy as np

                y = np.asarray(series[0][2])
                s = np.asarray(bs)
                ax.fill_between(bx, y - s, y + s, alpha=0.2, label="± within-group std")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1 or band is not None:
            ax.legend(fontsize=8)
        save(fig, name, title)

    for n in reward_names(rows):
        one([(f"reward/{n}", n)], f"reward_{n}.png", f"reward: {n}", band=f"reward/{n}_std")
    for key, title in CURVES:
        one([(key, title)], key.replace("/", "_") + ".png", title)
    one([(k, k.split("/")[1][:-2]) for k in PHASES], "time.png", "step time by phase (s)")
    return made


def find_eval_results(root: str, max_depth: int = 3) -> list[tuple[str, dict]]:
    """``(path, content)`` of every evaluation result file under ``root`` (sorted by path)."""
    found = []
    root = os.path.abspath(root)
    for d, subdirs, files in os.walk(root):
        depth = os.path.relpath(d, root).count(os.sep) + (d != root)
        if depth >= max_depth:
            subdirs[:] = []
        subdirs[:] = sorted(s for s in subdirs if s not in ("checkpoints", "judge_cache", "tb"))
        for name in EVAL_FILES:
            if name in files:
                try:
                    with open(os.path.join(d, name), encoding="utf-8") as f:
                        content = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue
                if isinstance(content, dict) and _kind(content):
                    found.append((os.path.join(d, name), content))
    return sorted(found)


def _kind(c: dict) -> Optional[str]:
    if c.get("protocol") in ("absolute", "pairwise"):
        return c["protocol"]
    if "bench" in c and "accuracy" in c:
        return "videoqa"
    if "overall" in c and "by_data_source" in c:
        return "auto"
    return None


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.4g}, {v[1]:.4g}]"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_tables(path: str, c: dict) -> str:
    """One evaluation result as an HTML section."""
    kind = _kind(c)
    title = f"<h3>{kind}: <code>{html.escape(path)}</code></h3>"
    if kind == "auto":
        cols = list(c["overall"].keys())
        groups = [("overall", c["overall"])] + list(c["by_data_source"].items())
        return title + _table(["group", *cols], [[g, *[m.get(k) for k in cols]] for g, m in groups])
    if kind == "videoqa":
        rows = [["all", c["accuracy"], c.get("ci95"), c["correct"], c["n"]]]
        rows += [[t, v["accuracy"], None, v["correct"], v["n"]] for t, v in c.get("by_type", {}).items()]
        head = ["type", "accuracy", "95% CI", "correct", "n"]
        return title + f"<p>{html.escape(c['bench'])}</p>" + _table(head, rows)
    if kind == "absolute":
        metrics = c.get("metrics", [])
        rows = [[name, *[f"{m[k]['mean']:.2f}" if m[k]["mean"] is not None else None for k in metrics],
                 *[m[k]["ci95"] for k in metrics], m.get("samples"), m.get("failed")]
                for name, m in c["models"].items()]
        return title + _table(["model", *metrics, *[f"{k} 95% CI" for k in metrics], "samples", "failed"], rows)
    s = c["metrics"]
    rows = [[k, v["win"], v["loss"], v["tie"], v["errors"], v["net_win_rate"], v["decisive_win_rate"], v["p_value"]]
            for k, v in s.items()]
    sub = (f"<p>anchor <b>{html.escape(c['anchor']['name'])}</b> vs <b>{html.escape(c['opponent']['name'])}</b>, "
           f"{c['samples']} samples</p>")
    return title + sub + _table(["metric", "win", "loss", "tie", "errors", "net win rate", "decisive win rate",
                                 "p-value"], rows)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}img{width:32%;min-width:320px}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;"
        "text-align:right}th{background:#eee}code{font-size:90%}")


def write_report(run_dir: str, out_dir: str = "") -> str:
    """Write the report of ``run_dir`` (see the module docstring); returns the path of index.html."""
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    out_dir = os.path.abspath(os.path.expanduser(out_dir)) if out_dir else os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    rows = read_metrics_rows(run_dir)
    plots = plot_curves(rows, out_dir) if rows else []
    results = find_eval_results(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fastebm report</title><style>{_CSS}</style>"
             f"</head><body><h1>fastebm report</h1><p>run: <code>{html.escape(run_dir)}</code></p>"]
    if rows:
        last = rows[-1]
        parts.append(f"<h2>Training curves</h2><p>{len(rows)} steps logged (last step {last['step']}).</p>")
        parts += [f"<img src='{html.escape(name)}' alt='{html.escape(title)}' title='{html.escape(title)}'>"
                  for name, title in plots]
        keys = [k for k in last if k != "step" and isinstance(last[k], (int, float)) and not k.endswith(_SUFFIXES)]
        parts.append("<h3>Last step</h3>" + _table(["metric", "value"], [[k, last[k]] for k in keys]))
    else:
        parts.append("<p>No metrics.jsonl in this directory.</p>")
    if results:
        parts.append("<h2>Evaluation</h2>" + "".join(eval_tables(os.path.relpath(p, run_dir), c) for p, c in results))
    parts.append("</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
