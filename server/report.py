"""The deployment report (``medsilo report RUN``): ``summary.json``, ``report.md``, ``report.html`` and plots.

A coordinator's run folder holds what the ServerApp wrote (:mod:`server.app`, :mod:`server.strategy`):
``run_config.json``, one ``metrics.jsonl`` line per round, ``federated.json`` and, when a round was aggregated,
``model-best.safetensors``. The report is built from those alone, with no dataset and no patient record: the
sites' federated validation per round (their DP-released sums, added up), who contributed, refused, failed or
went silent in each round, each site's ε, the rounds aggregated (or why none was), the model selected and its
decision rule (binary threshold, multi-class logit offsets or ordinal cut points, with the balanced accuracy and,
for ordinal tasks, quadratic κ they score on the summed validation) and, only when the coordinator scored a test
split of its own (``server-eval=true``), the test metrics. Sites carry the names the coordinator gave them (its
kit registry's, see :func:`server.site_reports.site_names_from_registry`). Every file is written atomically and
owner-only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common import recipes
from common.config import RunConfig
from common.datasets import DatasetInfo, Task, dataset_info
from common.errors import ConfigError, DataError
from common.io import atomic_write_json, atomic_write_text, read_jsonl
from common.models import resolve_model_name
from common.report_render import (
    markdown_to_html,
    metrics_table,
    plot_epsilon,
    plot_participation,
    plot_site_metric,
    plot_validation,
    privacy_row,
    stale_notes,
)
from server.progress import participation_parts

#: The files of a coordinator's run folder the report reads (as :mod:`server.app` and the strategy name them).
RUN_CONFIG, METRICS, FEDERATED, BEST_MODEL = "run_config.json", "metrics.jsonl", "federated.json", \
    "model-best.safetensors"

#: What the report writes into the run folder (besides ``plots/``).
SUMMARY, REPORT_MD, REPORT_HTML = "summary.json", "report.md", "report.html"

#: ``summary.json``'s ``kind`` for a deployment report (a simulation's summary has none).
KIND = "deployment"

#: How to point the command at a run folder, in every error about one.
_WHERE = ("pass the coordinator's run folder: the run's out-dir (`-c out-dir=...`), or medsilo-runs/run-<id> "
          "beside the SuperLink")


class RunFolderError(DataError):
    """A run folder that is missing, incomplete or damaged; the message names the file and the fix."""


@dataclass(frozen=True)
class RunFolder:
    """What a coordinator's run folder says, read and checked (see :meth:`read`)."""

    path: Path
    config: RunConfig
    info: DatasetInfo
    #: ``metrics.jsonl``'s lines, one per round (the last line of a round wins), by round.
    rounds: list[dict[str, Any]]
    federated: dict[str, Any]
    #: ``model-best.safetensors``'s medsilo metadata (round, threshold, model); empty without that file.
    best_meta: dict[str, Any]

    @classmethod
    def read(cls, run_dir: str | Path) -> RunFolder:
        """Read ``run_dir``; a missing, incomplete or damaged file raises one :class:`RunFolderError`."""
        path = Path(run_dir)
        if not path.is_dir():
            raise RunFolderError(f"run folder {path} not found; {_WHERE}")
        config = _config(path / RUN_CONFIG)
        try:
            info = dataset_info(config.dataset)
        except (DataError, KeyError, ValueError) as exc:
            raise RunFolderError(f"{path / RUN_CONFIG}: dataset={config.dataset!r} is not one this medsilo knows "
                                 f"({exc}); report the run with the medsilo version that ran it") from None
        rounds = _metrics(path / METRICS)
        federated = _json(path / FEDERATED, missing=(
            "the run has not finished: the coordinator writes it when its last round ends. Wait for the run to "
            "end, or continue a stopped run with -c 'resume=true'"))
        missing = [k for k in ("rounds", "aggregated_rounds", "privacy") if k not in federated]
        if missing:
            raise RunFolderError(f"{path / FEDERATED} lacks {', '.join(missing)}: it was not written by this "
                                 "medsilo's coordinator; report the run with the version that ran it")
        best = path / BEST_MODEL
        return cls(path=path, config=config, info=info, rounds=rounds, federated=federated,
                   best_meta=_checkpoint_meta(best) if best.is_file() else {})


def _json(path: Path, *, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise RunFolderError(f"{path} not found: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read ({exc}): the file is damaged; restore the run folder from "
                             "its backup") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} holds a JSON {type(data).__name__}, not an object: the file is damaged; "
                             "restore the run folder from its backup")
    return data


def _config(path: Path) -> RunConfig:
    raw = _json(path, missing=f"this is not a coordinator's run folder; {_WHERE}")
    known = {RunConfig.key(f.name) for f in fields(RunConfig)}
    try:  # settings of another version are left out; "auto" is resolved as the ServerApp resolves it
        return recipes.from_flower({k: v for k, v in raw.items() if k in known})
    except ConfigError as exc:
        raise RunFolderError(f"{path} holds settings this medsilo rejects ({'; '.join(exc.problems)}); report the "
                             "run with the medsilo version that ran it") from None


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RunFolderError(f"{path} not found: the coordinator stopped before its first round ended, so there "
                             "is nothing to report; start the run again")
    try:
        lines = read_jsonl(path)
        by_round = {int(line["round"]): line for line in lines}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunFolderError(f"{path} cannot be read ({type(exc).__name__}: {exc}): a line is damaged; restore "
                             "the run folder from its backup") from None
    return [by_round[r] for r in sorted(by_round)]


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """The medsilo metadata of a safetensors file, from its JSON header alone (no tensor is loaded)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:
                raise ValueError(f"header size {size}")
            header = json.loads(handle.read(size))
        meta = json.loads(header.get("__metadata__", {}).get("medsilo", "{}"))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise RunFolderError(f"{path} is not a readable safetensors checkpoint ({exc}): the file is damaged; "
                             "restore the run folder from its backup") from None
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------- the summary
def participation_notes(rounds: list[dict[str, Any]]) -> list[str]:
    """One line per round in which a site refused, failed or went silent, or nothing was aggregated."""
    return [f"round {r['round']}: " + "".join(text for text, _ in participation_parts(r))
            for r in rounds if r["round"] > 0 and (r.get("refused") or r.get("sites_failed") or r.get("dropped")
                                                   or r.get("halted_stage"))]


def refusal_reasons(rounds: list[dict[str, Any]]) -> list[str]:
    """One line per refusal or failure, with the round, the site and the reason it gave (or the error)."""
    out = []
    for r in (r for r in rounds if r["round"] > 0):
        for outcome, entries in (("refused", r.get("refused")), ("failed", r.get("failed"))):
            for name, entry in zip(_names(entries), entries or [], strict=True):
                stage = f" at the {entry['stage']} stage" if isinstance(entry, dict) and entry.get("stage") else ""
                reason = entry.get("reason") if isinstance(entry, dict) else None
                out.append(f"round {r['round']}: {name} {outcome}{stage}: {reason or 'no reason given'}")
    return out


def _names(entries: list[Any] | None) -> list[str]:
    return [str(e.get("site") or (f"node {e['node_id']}" if e.get("node_id") is not None else "unknown site"))
            if isinstance(e, dict) else str(e) for e in entries or []]


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity made ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def participation(rounds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Per round, who contributed, refused, failed or went silent; per site, how many rounds of each."""
    by_round: list[dict[str, Any]] = []
    by_site: dict[str, dict[str, int]] = {}
    for r in (r for r in rounds if r["round"] > 0):
        row = {"round": r["round"], "sites_asked": int(r.get("sites_sampled") or 0),
               "contributed": list(r.get("contributors") or []), "refused": _names(r.get("refused")),
               "failed": _names(r.get("failed")), "silent": _names(r.get("dropped")),
               "halted_stage": r.get("halted_stage")}
        by_round.append(row)
        for outcome in ("contributed", "refused", "failed", "silent"):
            for site in row[outcome]:
                counts = by_site.setdefault(site, {"contributed": 0, "refused": 0, "failed": 0, "silent": 0})
                counts[outcome] += 1
    return by_round, dict(sorted(by_site.items()))


def deployment_summary(run: RunFolder) -> dict[str, Any]:
    """The run's ``summary.json``: settings, rounds aggregated, the selected model, validation, ε, participation."""
    cfg, fed, info = run.config, run.federated, run.info
    key = "dice_mean" if info.task is Task.SEGMENTATION else "auc"
    by_round, by_site = participation(run.rounds)
    privacy = list(fed.get("privacy") or [])
    never = list(fed.get("never_reported") or [])
    sites = set(by_site) | {str(p["site"]) for p in privacy} | {str(n.get("site")) for n in never}
    sites |= {str(s["site"]) for r in run.rounds for s in r.get("val_sites") or [] if s.get("site")}
    best_round = fed.get("best_round")
    lines = {r["round"]: r for r in run.rounds}
    best_val = (lines.get(best_round) or {}).get("val") or {}
    threshold = None
    if info.task is not Task.SEGMENTATION and best_round is not None:
        threshold = run.best_meta.get("threshold", best_val.get("threshold", 0.5))
    decision = run.best_meta.get("decision", best_val.get("decision")) if best_round is not None else None
    summary: dict[str, Any] = {
        "kind": KIND, "dataset": info.name, "task": info.task.value, "labels": list(info.labels),
        "model": run.best_meta.get("model") or resolve_model_name(cfg.model, info),
        "strategy": fed.get("strategy", cfg.aggregation), "rounds": int(fed["rounds"]),
        "rounds_run": max((r["round"] for r in run.rounds), default=0), "local_epochs": cfg.local_epochs,
        "aggregated_rounds": int(fed["aggregated_rounds"]), "secure_aggregation": cfg.secure_aggregation,
        "min_sites": cfg.min_sites, "dp": cfg.dp, "epsilon": cfg.epsilon if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None, "server_eval": cfg.server_eval,
        "primary_metric": key, "selected_by": "federated validation", "best_round": best_round,
        "threshold": threshold, "decision": decision,
        "validation": {"round": best_round, **best_val} if best_round is not None else {},
        "final_round": max((r["round"] for r in run.rounds if r["round"] > 0 and r.get("sites_sampled")), default=0),
        "validation_by_round": [{"round": r["round"], **r["val"]} for r in run.rounds if r.get("val")],
        "sites": sorted(sites), "participation": by_site, "participation_by_round": by_round,
        "privacy": privacy, "never_reported": never,
        "privacy_unit": "patient" if any(p.get("privacy_unit") == "patient" for p in privacy) else "record",
    }
    if not summary["aggregated_rounds"]:
        summary["why_not_aggregated"] = list(fed.get("why_not_aggregated") or ["no round was aggregated"])
    if cfg.server_eval:
        summary["test"] = fed.get("best", {})
        summary["test_final"] = fed.get("final", {})
    return _finite(summary)


# ---------------------------------------------------------------------------------------------- the report
def _value(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.3f}"


def _validation_table(summary: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    seg = summary["primary_metric"] == "dice_mean"
    labels = summary["labels"] if seg else []
    head = ["round", "contributed / asked", "sites validating",
            *([f"val Dice {lb}" for lb in labels] + ["val Dice mean"] if seg else ["val AUC", "threshold"])]
    extra = _decision_columns(summary["task"])
    head += [title for title, _ in extra]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in rounds if r["round"] > 0):
        val = r.get("val") or {}
        defined = val.get("dice_defined" if seg else "auc_defined", 1) and val.get("sites", 1)
        answered = int(r.get("sites_answered") or 0)
        cells = [str(r["round"]), f"{answered} / {r.get('sites_sampled', 0)}" + ("" if answered else
                 " (not aggregated)"), str(val.get("sites", "-"))]
        if seg:
            cells += [_value(val.get("dice", {}).get(lb)) if defined else "-" for lb in labels]
            cells.append(_value(val.get("dice_mean")) if defined else "-")
        else:
            cells += [_value(val.get("auc")) if defined else "-", _value(val.get("threshold"))]
            cells += [_value(val.get(key)) if defined else "-" for _, key in extra]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _decision_columns(task: str) -> list[tuple[str, str]]:
    """Validation columns of a task's decision rule: (title, key of the round's ``val``)."""
    if task == Task.ORDINAL.value:
        return [("val balanced acc.", "balanced_accuracy"), ("val κ (quadratic)", "kappa")]
    if task == Task.MULTICLASS.value:
        return [("val one-vs-rest balanced acc.", "ovr_balanced_accuracy")]
    return []


def _decision_text(summary: dict[str, Any]) -> str:
    """The selected model's multi-class or ordinal decision rule and what it scores on the summed validation."""
    decision, val = summary["decision"], summary["validation"]
    where = "from the sites' summed validation statistics (each released inside the site's ε; no record pooled)"
    if decision.get("kind") == "ordinal-cut-points":
        cuts = ", ".join(f"{c:.3f}" for c in decision["cut_points"])
        return (f"expected grade cut at {cuts} {where}: validation balanced accuracy "
                f"{_value(val.get('balanced_accuracy'))}, quadratic κ {_value(val.get('kappa'))}")
    offsets = ", ".join(f"{o:+.1f}" for o in decision.get("offsets", []))
    return (f"arg-max of class logits plus offsets {offsets} {where}: validation one-vs-rest balanced accuracy "
            f"{_value(val.get('ovr_balanced_accuracy'))}")


def _participation_table(by_site: dict[str, dict[str, int]]) -> str:
    out = ["| site | contributed | refused | failed | silent (no reply) |", "|---|---|---|---|---|"]
    out += [f"| {site} | {c['contributed']} | {c['refused']} | {c['failed']} | {c['silent']} |"
            for site, c in by_site.items()]
    return "\n".join(out) if by_site else "No site answered or was named in any round."


def _selection(summary: dict[str, Any]) -> list[str]:
    """The model-selection and test lines of the report's header."""
    if not summary["aggregated_rounds"]:
        return ["model selected: **none, no round was aggregated** (no model file was written)"]
    label = "Dice" if summary["primary_metric"] == "dice_mean" else "AUC"
    val = summary["validation"].get(summary["primary_metric"])
    task = summary["task"]
    if task == Task.SEGMENTATION.value:
        threshold = "per-voxel arg-max (no threshold)"
    elif task == Task.BINARY.value:
        threshold = (f"decision threshold {summary['threshold']:.3f} from the sites' summed validation histograms "
                     "(each released inside the site's ε; no site's records pooled)")
    elif summary.get("decision"):
        threshold = _decision_text(summary)
    else:
        threshold = f"threshold {summary['threshold']:.3f} (fixed)"
    lines = [f"model selected: round {summary['best_round']}, best on the sites' federated validation "
             f"(validation {label} {_value(val)}); {threshold}; file `{BEST_MODEL}`"]
    if summary["server_eval"]:
        lines.append("test metrics: the coordinator's own copy of the public test split (server-eval=true); they "
                     "did not select the model")
    else:
        lines.append("test metrics: none. The coordinator held no data (server-eval=false): the model was "
                     "selected by the sites' federated validation alone")
    return lines


def render_markdown(summary: dict[str, Any], rounds: list[dict[str, Any]], run_name: str) -> str:
    """The report's Markdown (plots referenced as ``plots/*.png``)."""
    dp = (f"DP-SGD at every site, ε={summary['epsilon']:g}, δ={summary['delta']:g} per site over the whole run "
          f"(training, record counts and validation releases); privacy unit: {summary['privacy_unit']}"
          if summary["dp"] else "off")
    secagg = f"SecAgg+ (a sum is unmasked only from {max(2, summary['min_sites'])} sites or more)" \
        if summary["secure_aggregation"] else "OFF (the coordinator saw each site's update)"
    head = [f"run folder `{run_name}`; {len(summary['sites'])} sites: {', '.join(summary['sites']) or 'none'}",
            f"model `{summary['model']}`, aggregation `{summary['strategy']}`, {summary['aggregated_rounds']} of "
            f"{summary['rounds_run']} rounds aggregated ({summary['rounds']} planned) x {summary['local_epochs']} "
            "local epoch(s)", f"secure aggregation: {secagg}", f"differential privacy: {dp}", *_selection(summary)]
    parts = [f"# medsilo deployment run: {summary['dataset']}, {len(summary['sites'])} sites", "",
             *[f"- {line}" for line in head], "", "## Result", ""]
    if not summary["aggregated_rounds"]:
        parts += ["**No round was aggregated: this run has no trained model.** Why:", "",
                  *[f"- {reason}" for reason in summary["why_not_aggregated"]], ""]
    elif summary.get("test"):
        models = [(f"selected (round {summary['best_round']})", summary["test"])]
        if summary.get("test_final") and summary["test_final"].get("round") != summary["best_round"]:
            models.append((f"final (round {summary['test_final'].get('round')})", summary["test_final"]))
        parts += [metrics_table(models), "", "On the coordinator's test split; AUC intervals are bootstrap 95%.",
                  ""]
        kappas = [f"{name} {_value(m['kappa'])}" for name, m in models if "kappa" in m]
        if kappas:
            parts += [f"Quadratic-weighted Cohen's κ on the test split: {'; '.join(kappas)}.", ""]
    else:
        parts += [f"The model of round {summary['best_round']} is the run's result: no test split was scored at "
                  "the coordinator; its validation below is the sites' released statistics, summed.", ""]
    parts += ["## Federated validation", "", "Each value is computed from the sum of the sites' DP-released "
              "validation statistics (no record leaves a site).", "", _validation_table(summary, rounds), "",
              "![validation per round](plots/validation.png) ![validation per site](plots/site_validation.png)", "",
              "## Participation", "", _participation_table(summary["participation"]), ""]
    notes = participation_notes(rounds)
    parts += [f"- {n}" for n in notes] or ["Every site asked contributed to every round."]
    reasons = refusal_reasons(rounds)
    if reasons:
        parts += ["", "Refusals and failures, with the reasons the sites gave:", "", *[f"- {r}" for r in reasons]]
    parts += ["", "Every refusal, failure and silence of each round is in `metrics.jsonl`.", "",
              "![participation per round](plots/participation.png)", "", "## Privacy", ""]
    if summary["privacy"]:
        parts += ["| site | ε this run | ε lifetime | δ | accountant | sampling | noise multiplier | sample rate "
                  "| reported in round |", "|---|---|---|---|---|---|---|---|---|",
                  *[privacy_row(p) for p in summary["privacy"]], ""]
        parts += [f"- {n}" for n in stale_notes(summary["privacy"])]
    else:
        parts.append("No site reported a DP ledger." if summary["dp"] else "DP off.")
    parts += [f"- {n['site']}: asked up to round {n.get('last_asked_round')}, never reported; the coordinator "
              "knows nothing of its ε (its own ledger does: `medsilo site ledger`)" for n in summary["never_reported"]]
    parts += ["", "![ε per round](plots/epsilon.png)", ""]
    return "\n".join(parts)


def build_deployment_report(run_dir: Path) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md``, ``report.html`` and ``plots/`` into a coordinator's run folder.

    Parameters
    ----------
    run_dir
        The run's out-dir, as the ServerApp left it (see the module docstring); nothing else is read.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    RunFolderError
        The folder is missing, not a coordinator's run, unfinished or damaged, or holds a simulation's report.

    """
    run = RunFolder.read(run_dir)
    existing = run.path / SUMMARY
    if existing.is_file():
        try:
            kind = json.loads(existing.read_text(encoding="utf-8")).get("kind")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            kind = None
        if kind != KIND:
            raise RunFolderError(f"{existing} is not a deployment report's summary (a `medsilo simulate` run "
                                 "folder already has its report); open its report.html, or move summary.json "
                                 "away to report the coordinator's files again")
    summary = deployment_summary(run)
    plots = run.path / "plots"
    key = summary["primary_metric"]
    plot_validation(run.rounds, plots / "validation.png", key=key, best_round=summary["best_round"],
                    title=f"{summary['dataset']}: federated validation per round")
    plot_site_metric(run.rounds, plots / "site_validation.png", key=key)
    plot_participation(run.rounds, plots / "participation.png")
    plot_epsilon(run.rounds, summary["epsilon"], plots / "epsilon.png")
    markdown = render_markdown(summary, run.rounds, run.path.name)
    atomic_write_json(run.path / SUMMARY, summary)
    atomic_write_text(run.path / REPORT_MD, markdown)
    title = f"medsilo deployment run: {summary['dataset']}, {len(summary['sites'])} sites"
    atomic_write_text(run.path / REPORT_HTML, markdown_to_html(markdown, base=run.path, title=title))
    return summary


def headline(summary: dict[str, Any], run_dir: Path) -> str:
    """What ``medsilo report`` prints: where the report is, and the run's outcome in one line."""
    where = f"report: {run_dir / REPORT_HTML} (and {REPORT_MD}, {SUMMARY}, plots/)"
    if not summary["aggregated_rounds"]:
        return f"{where}\nno round was aggregated: " + "; ".join(summary.get("why_not_aggregated", []))
    label = "Dice" if summary["primary_metric"] == "dice_mean" else "AUC"
    val = _value(summary["validation"].get(summary["primary_metric"]))
    line = (f"{where}\nselected round {summary['best_round']} of {summary['rounds_run']} by federated validation "
            f"({label} {val}); {summary['aggregated_rounds']} rounds aggregated")
    if summary.get("test"):
        line += f"; test {label} {_value(summary['test'].get(summary['primary_metric']))}"
    return line
