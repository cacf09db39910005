"""The study's report: every item's tables and plots, built from the tracking store."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from html import escape
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import noise, plots, queries, reference, tables
from analysis.folder import (
    csv_bytes,
    displayed,
    markdown_table,
    md_text,
    png_bytes,
    write_folder,
)
from cifarexp import tracking
from cifarexp.config import ConfigError, plural
from cifarexp.study.catalogue import ITEMS, SECTIONS, TITLES
from cifarexp.training.energy import joules_text


@dataclass
class Section:
    """One item of the study: its tables, plots and text, and the runs they came from."""

    item: str
    heading: str
    command: str  # the command that produces it
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    text: str = ""
    notes: list[str] = field(default_factory=list)  # what makes it less than a result
    source: str = ""  # run ids, dataset, device
    dataset: str = ""
    run_id: str = ""  # the top-level run it came from
    settings: dict[str, str] = field(default_factory=dict)  # that run's params
    disturbed: dict[str, str] = field(default_factory=dict)  # variant -> why its timing was

    @property
    def missing(self) -> bool:
        return not self.tables

    def metrics(self) -> dict[str, float]:
        """The one-number answers, logged as metrics on the section's parent run."""
        return headline(self)

    def tags(self) -> dict[str, str]:
        """The answers that are no numbers, logged as tags on the section's parent run: the
        best optimizer (C6), the variants whose timing was disturbed, with why."""
        tags = {}
        if self.disturbed:
            tags[tracking.TIMING_DISTURBED] = "; ".join(
                f"{variant}: {why}" for variant, why in self.disturbed.items()
            )
        c6 = self.tables.get("c6_optimizers")
        if c6 is None or c6.empty:
            return tags
        best = c6.loc[c6[tables.FINAL_ACCURACY].idxmax(), "optimizer"]
        return tags | {f"{tracking.TAG}best_optimizer": str(best)}

    @property
    def answer(self) -> str:
        """The answer in one or two sentences, from the section's tables (the sweep's is
        the C4 explanation)."""
        return answer(self)


Builder = Callable[[queries.Exercise], tuple[dict, dict, str]]


def _subtitle(ex: queries.Exercise) -> str:
    return f"({ex.dataset}, {ex.device_name})"


def _c2(ex: queries.Exercise) -> tuple[dict, dict, str]:
    verdict = ex.parent.get(f"tags.{tracking.VERDICT}")  # a profiled run's (--profile)
    text = f"Profile: {verdict}." if isinstance(verdict, str) and verdict else ""
    return {"c2_epochs": tables.c2_epochs(ex)}, {}, text


def _c3(ex: queries.Exercise) -> tuple[dict, dict, str]:
    c3 = tables.c3_workers(ex)
    c4 = tables.c4_one_vs_best(c3)
    cpus = str(ex.parent.get(f"tags.{tracking.TAG}cpu_count", "?"))
    figure = plots.workers_curve(c3, _subtitle(ex))
    return (
        {"c3_workers": c3, "c4_one_vs_best": c4},
        {"c3_workers": figure},
        tables.c4_explanation(c3, cpus),
    )


def _c5(ex: queries.Exercise) -> tuple[dict, dict, str]:
    c5 = tables.c5_devices(ex)
    figures = {"c5_devices": plots.device_breakdown(c5, _subtitle(ex))}
    return {"c5_devices": c5}, figures, _c5_without_gpu(ex, c5)


def _c5_without_gpu(ex: queries.Exercise, c5: pd.DataFrame) -> str:
    """Why C5 has no GPU to compare with, when it has none: none was found (the parent's
    CUDA_DEVICES tag says 0), or none was asked for."""
    if c5["device"].astype(str).str.startswith("cuda").any():
        return ""
    if str(ex.parent.get(f"tags.{tracking.CUDA_DEVICES}")) == "0":
        return (
            "No CUDA device was found: C5 compares a CUDA GPU with the CPU and needs one; "
            "the CPU was timed alone, with no speedup."
        )
    return "No GPU ran (--devices left it out): the CPU was timed alone, with no speedup."


def _c5_scaling(ex: queries.Exercise) -> tuple[dict, dict, str]:
    c5 = tables.c5_scaling(ex)
    return {"c5_scaling": c5}, {"c5_scaling": plots.scaling_curve(c5, _subtitle(ex))}, ""


def _c6(ex: queries.Exercise) -> tuple[dict, dict, str]:
    c6 = tables.c6_optimizers(ex)
    per_epoch = {
        "c6_accuracy": tables.c6_per_epoch(ex, "train_acc"),
        "c6_loss": tables.c6_per_epoch(ex, "train_loss"),
    }
    labels = dict(zip(ex.runs["run_id"], c6["optimizer"], strict=True))
    figure = plots.per_epoch_curves(ex.epochs, labels, f"C6: optimizers {_subtitle(ex)}")
    return {"c6_optimizers": c6, **per_epoch}, {"c6_optimizers": figure}, ""


def _c7(ex: queries.Exercise) -> tuple[dict, dict, str]:
    c7 = tables.c7_batch_norm(ex)
    labels = dict(zip(ex.runs["run_id"], c7["model"], strict=True))
    title = f"C7: with and without BatchNorm {_subtitle(ex)}"
    return (
        {"c7_batch_norm": c7},
        {"c7_batch_norm": plots.per_epoch_curves(ex.epochs, labels, title)},
        "",
    )


def _q(ex: queries.Exercise) -> tuple[dict, dict, str]:
    answers = queries.answers(ex)
    if not answers:  # a store copied without its artifact folder, say
        return (
            {},
            {},
            (
                f"The inspect run {ex.parent_id} has no readable answers.json among its "
                "artifacts: is its artifact location (e.g. ./mlartifacts) beside the store?"
            ),
        )
    return {"q1_q4": tables.q1_q4_answers(answers)}, {}, ""


# item -> the builder of its tables, plots and text
BUILDERS: dict[str, Builder] = {
    "C2": _c2, "C3": _c3, "C5": _c5, "C5-scaling": _c5_scaling, "C6": _c6, "C7": _c7, "Q1-Q4": _q,
}  # fmt: skip


def section(item: str, ex: queries.Exercise | None) -> Section:
    """The section of `item` built from `ex` (an empty, missing section when ex is None)."""
    result = Section(item, ITEMS[item].heading, ITEMS[item].command)
    if ex is not None:
        result.tables, result.figures, result.text = BUILDERS[item](ex)
        result.tables |= reference.beside(item, ex)
        result.notes = warnings(ex) + timing_notes(item, ex)
        result.disturbed = ex.disturbed
        result.dataset, result.run_id = ex.dataset, ex.parent_id
        result.settings = ex.params
        runs = (
            f"run {ex.parent_id}"
            if ex.run_ids == [ex.parent_id]
            else f"runs {', '.join(ex.run_ids)} (parent {ex.parent_id})"
        )
        result.source = (
            f"{runs}; dataset {ex.dataset}; device {ex.device_name}; "
            f"{ex.settings or 'settings not recorded'}"
        )
    return result


def profiles_section() -> Section:
    """The verdict and the step's split of each kind of profiled run (`--profile`), oldest
    first: the bottleneck moving as the study removes it."""
    result = Section("profiles", ITEMS["profiles"].heading, ITEMS["profiles"].command)
    runs = queries.profiled_runs()
    if runs.empty:
        return result
    table = tables.profiles(runs)
    shown = table.drop(columns=["verdict", "run_id"])
    result.tables, result.figures = {"profiles": shown}, {"profiles": plots.profile_split(shown)}
    result.text = "\n".join(
        f"- {run}: {verdict}." for run, verdict in zip(table["run"], table["verdict"], strict=True)
    )
    result.dataset = ", ".join(sorted(set(runs[f"tags.{tracking.DATASET}"])))
    result.source = f"runs {', '.join(table['run_id'])}; dataset {result.dataset}"
    return result


def warnings(ex: queries.Exercise) -> list[str]:
    """What a reader must know before trusting a section's numbers."""
    notes = []
    if ex.missing_variants:
        notes.append(
            f"Incomplete: no finished run of {', '.join(ex.missing_variants)} is in the store "
            "any more (deleted?), although the comparison ran it; the tables leave it out."
        )
    for variant, epoch in ex.diverged.items():
        notes.append(
            f"Diverged: {variant}'s training loss is not finite from epoch {epoch} on (NaN or "
            "infinite); its loss and accuracy are not a result."
        )
    return notes


# The comparisons whose timings are compared in a note: item -> (metric, what it is, the
# tolerance under which a difference is noise whatever the epochs' spread).
NOISE_COMPARED = {
    "C5": ("epoch_time_s", "epoch time", tables.EPOCH_NOISE),
    "C6": ("train_time_s", "training time per epoch", tables.EPOCH_NOISE),
}


def timing_notes(item: str, ex: queries.Exercise) -> list[str]:
    """The runs whose timing was disturbed, with why; for a comparison of timings (C5, C6),
    the variants whose time is within noise of the fastest's (C3's best count and C4's
    shortest epoch take noise into account themselves)."""
    notes = noise.disturbed_notes(ex)
    if item in NOISE_COMPARED and not ex.epochs.empty:
        metric, what, tolerance = NOISE_COMPARED[item]
        times = noise.spread(ex, {metric: metric})
        disturbed = set(ex.disturbed_ids)
        runs = ex.runs.set_index("run_id").loc[times.index]
        names = list(runs.get(f"tags.{tracking.VARIANT}", pd.Series(list(times.index))))
        timings = [
            replace(noise.Timing.of(row, metric), disturbed=run_id in disturbed)
            for run_id, row in times.iterrows()
        ]
        note = noise.within_noise_note(names, timings, what, tolerance)
        notes += [note] if note else []
    return notes


def summarize(item: str, run_id: str) -> Section:
    """The section of `item` from the run `run_id` (a comparison's parent, say)."""
    return section(item, queries.exercise(item, run_id=run_id))


def headline(section: Section) -> dict[str, float]:
    """The one-number answers of a section, logged as metrics on its parent run: few, and
    named apart from its children's summary metrics (`engine.summary`: final_acc,
    avg_epoch_time_s, ...), which MLflow's charts compare variant by variant."""
    metrics = {}
    if "c3_workers" in section.tables:
        metrics["best_workers"] = tables.best_workers(section.tables["c3_workers"])
    c5 = section.tables.get("c5_devices", pd.DataFrame())
    speedup = c5.get("speedup vs cpu")
    if speedup is not None and len(speedup) > 1:
        metrics["gpu_speedup"] = float(speedup.max())
    if tables.ENERGY_VS_CPU in c5:  # the CPU's J/epoch over each device's
        ratios = c5.loc[c5["device"] != "cpu", tables.ENERGY_VS_CPU].dropna()
        if not ratios.empty:  # both the CPU and a GPU measured it
            metrics["cpu_gpu_energy_ratio"] = float(ratios.max())
    c6 = section.tables.get("c6_optimizers", pd.DataFrame())
    if not c6.empty:  # the best optimizer's (0-1), named in the best_optimizer tag
        metrics["best_final_acc"] = float(c6[tables.FINAL_ACCURACY].max()) / 100
    c7 = section.tables.get("c7_batch_norm", pd.DataFrame())
    final = dict(zip(c7.get("model", []), c7.get(tables.FINAL_ACCURACY, []), strict=True))
    if {"BN", "no BN"} <= final.keys():  # what BatchNorm adds to the final accuracy (0-1)
        metrics["acc_gap"] = float(final["BN"] - final["no BN"]) / 100
    if "c5_scaling" in section.tables:  # the efficiency at the most GPUs, per mode
        for mode, rows in section.tables["c5_scaling"].groupby("scaling"):
            if mode != "–":
                efficiency = float(rows[tables.EFFICIENCY].iloc[-1]) / 100  # a fraction, 0-1
                metrics[f"{mode}_scaling_efficiency"] = efficiency
    return metrics


def answer(section: Section) -> str:
    """See `Section.answer`."""
    t, m = section.tables, headline(section)
    if "c2_epochs" in t:
        c2 = t["c2_epochs"].set_index("epoch")
        mean = c2.loc["mean"]
        energy = (
            f" It used {joules_text(mean[tables.ENERGY])} ({mean[tables.POWER]:.0f} W)."
            if tables.ENERGY in mean
            else ""
        )
        if "median" not in c2.index:  # one epoch
            return (
                f"An epoch took {mean['total s']:.2f} s on average: {mean['data-loading s']:.2f} s "
                f"waiting for data and {mean['training s']:.2f} s computing.{energy}"
            )
        epochs = c2[[not isinstance(label, str) for label in c2.index]]
        median, low, high = c2.loc["median"], epochs.min(), epochs.max()
        parts = [f"{median[c]:.2f} s ({low[c]:.2f}–{high[c]:.2f})" for c in tables.TIMES.values()]
        return (
            f"An epoch took {parts[2]} over its {len(epochs)} epochs (median, min–max): "
            f"{parts[0]} waiting for data and {parts[1]} computing.{energy}"
        )
    if "c3_workers" in t:
        return f"The best count is {plural(m['best_workers'], 'worker')}. {section.text}"
    if "c5_devices" in t:
        rows = t["c5_devices"]
        batches = section.settings.get("cpu_batches")
        epochs = ", ".join(_c5_epoch(r, batches) for _, r in rows.iterrows())
        speedup = f": the GPU is {m['gpu_speedup']:.1f}x faster" if "gpu_speedup" in m else ""
        energy = _energy_per_epoch(rows, "device")
        return f"Average epoch time per device: {epochs}{speedup}.{energy} {section.text}".strip()
    if "c5_scaling" in t:
        gpus = t["c5_scaling"]["GPUs"].max()
        modes = [f"{k.removesuffix('_scaling_efficiency')} {v:.1%}" for k, v in m.items()]
        return f"Scaling efficiency at {plural(gpus, 'GPU')}: {', '.join(modes)}."
    if "c6_optimizers" in t:
        c6 = t["c6_optimizers"].sort_values(tables.FINAL_ACCURACY, ascending=False)
        ranked = ", ".join(
            f"{name} {acc:.1f}%"
            for name, acc in zip(c6["optimizer"], c6[tables.FINAL_ACCURACY], strict=True)
        )
        energy = _energy_per_epoch(t["c6_optimizers"], "optimizer")
        return f"Final training accuracy, best first: {ranked}.{energy}"
    if "c7_batch_norm" in t:
        c7 = t["c7_batch_norm"]
        final = dict(zip(c7["model"], c7[tables.FINAL_ACCURACY], strict=True))
        text = ", ".join(f"{model} {acc:.1f}%" for model, acc in final.items())
        points = 100 * m.get("acc_gap", 0.0)
        gap = f" (BatchNorm adds {points:.1f} percentage points)" if "acc_gap" in m else ""
        return f"Final training accuracy: {text}{gap}."
    if "q1_q4" in t:
        values = dict(zip(t["q1_q4"]["quantity"], t["q1_q4"]["value"], strict=True))
        state = ", ".join(
            f"{q.removesuffix(': optimizer state MiB')} {v:.2f} MiB"
            for q, v in values.items()
            if q.endswith(": optimizer state MiB")
        )
        return (
            f"{values['convolutional layers']} convolutional layers; the last linear layer "
            f"receives {values['input dimension of the last linear layer']} features; "
            f"{values['trainable parameters']:,} trainable parameters; optimizer state: {state}."
        )
    return ""


def _c5_epoch(row: pd.Series, batches: object) -> str:
    """A device's average epoch in C5's answer; an estimated one says from how many batches,
    and its range where it has one."""
    text = f"{row['device']} {row['avg epoch s']:.2f} s"
    if not row["estimated"]:
        return text
    low, high = row.get(tables.ESTIMATE_LOW), row.get(tables.ESTIMATE_HIGH)
    spread = f", {low:.2f}–{high:.2f} s" if pd.notna(low) and pd.notna(high) else ""
    given = batches not in (None, "", "None")
    of = f" from {batches} batch{'es' * (str(batches) != '1')} an epoch" if given else ""
    return f"{text} (estimated{of}{spread})"


def report_description(sections: list[Section]) -> str:
    """The report run's description (markdown): each item's answer in a line, or how to
    produce it."""
    lines = []
    for s in sections:
        if s.item == "profiles":
            continue
        shown = s.answer or s.text or "see its tables"
        lines.append(
            f"- **{s.heading}**: "
            + (f"not run yet; run `{s.command}`." if s.missing else shown.split("\n")[0])
        )
    return "\n".join(lines)


def _energy_per_epoch(table: pd.DataFrame, by: str) -> str:
    """A sentence of the energy per epoch by `by` where measured (the table's J/epoch), and
    how many times less of it a GPU used than the CPU; else nothing."""
    if tables.EPOCH_J not in table:
        return ""
    rows = table[table[tables.EPOCH_J].notna()]
    shown = ", ".join(
        f"{name} {joules_text(j)}" for name, j in zip(rows[by], rows[tables.EPOCH_J], strict=True)
    )
    less = ""
    if tables.ENERGY_VS_CPU in rows:
        ratio = rows.loc[rows[by] != "cpu", tables.ENERGY_VS_CPU].dropna()
        less = f" ({ratio.max():.1f}x less than the CPU's)" if not ratio.empty else ""
    return f" Energy per epoch: {shown}{less}."


def pick_runs(pairs: list[str]) -> dict[str, str]:
    """ITEM=RUN_ID pairs -> item -> run id; each a finished run of its item, else a
    ConfigError (naming the runs option)."""
    run_ids: dict[str, str] = {}
    for pair in pairs:
        item, _, run_id = pair.partition("=")
        if item not in SECTIONS or not run_id:
            raise ConfigError(
                f"{pair!r} is not ITEM=RUN_ID with ITEM in {', '.join(SECTIONS)}", "runs"
            )
        if item in run_ids:
            raise ConfigError(f"{item} is given twice", "runs")
        if not tracking.is_run_id(run_id):
            raise ConfigError(f"{run_id!r} is not a run id (32 hex digits)", "runs")
        run = queries.run_by_id(run_id)
        if run is None:
            raise ConfigError(f"no run {run_id} in {tracking.shown_uri()}", "runs")
        exercise = run.get(f"tags.{tracking.EXERCISE}")
        if exercise != item:
            raise ConfigError(
                f"run {run_id} is a {exercise or 'non-cifarexp'} run, not {item}", "runs"
            )
        if run["status"] != "FINISHED":
            raise ConfigError(
                f"run {run_id} is {run['status']}: the report takes finished runs", "runs"
            )
        run_ids[item] = run_id
    return run_ids


def build_report(run_ids: Mapping[str, str] | None = None) -> list[Section]:
    """Every item's section from the latest finished runs (or the given run id per item),
    then the profiles."""
    run_ids = run_ids or {}
    items = [section(item, queries.exercise(item, run_ids.get(item))) for item in SECTIONS]
    return [*items, profiles_section()]


def write_report(sections: list[Section], out: Path, tracking_uri: str) -> Path:
    """`out`/report.md with every table and plot in study order, one CSV per table, PNGs,
    and the same as report.html, its plots inlined (what MLflow's artifact view shows:
    it renders HTML, never markdown's image links); written whole or not at all
    (`folder.write_folder`)."""
    page = Page("cifarexp report")
    synthetic = [s for s in sections if s.dataset == "synthetic"]
    if synthetic:
        ran = [s for s in sections if s.dataset]
        which = "All the results" if len(synthetic) == len(ran) else "Some results"
        page.note(
            "Synthetic data.",
            f"{which} below were measured on the synthetic, CIFAR-shaped dataset, not on "
            "CIFAR-10: timings mean the same, accuracies do not.",
        )
    page.paragraph(f"Built {datetime.now():%Y-%m-%d %H:%M} from {tracking_uri}.")
    files: dict[str, bytes] = {}
    for s in sections:
        page.heading(s.heading)
        if s.missing:
            page.missing(s.command)
            continue
        for note in s.notes:
            page.note(note)
        page.paragraph(f"Source: {s.source}.")
        for name, table in s.tables.items():
            files[f"{name}.csv"] = csv_bytes(table)
            page.table(TITLES[name], table)
        if s.text:
            for paragraph in s.text.split("\n"):
                page.paragraph(paragraph, raw=True)
        for name, figure in s.figures.items():
            files[f"{name}.png"] = png_bytes(figure)
            page.image(TITLES[name], f"{name}.png", files[f"{name}.png"])
    files["report.md"] = page.markdown().encode()
    files["report.html"] = page.html().encode()
    write_folder(out, files)
    return out / "report.md"


@dataclass
class Page:
    """One document written twice: as markdown (report.md, beside its PNGs) and as one HTML
    file with its images inlined (report.html)."""

    title: str
    md: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.body.append(f"<h2>{escape(text)}</h2>")

    def note(self, bold: str, rest: str = "") -> None:
        space = " " if rest else ""
        self.md += [f"> **{md_text(bold)}**{space}{md_text(rest)}", ""]
        self.body.append(f"<blockquote><b>{escape(bold)}</b>{space}{escape(rest)}</blockquote>")

    def missing(self, command: str) -> None:
        self.md += [f"*Not run yet.* Produce it with `{command}`.", ""]
        self.body.append(
            f"<p><i>Not run yet.</i> Produce it with <code>{escape(command)}</code>.</p>"
        )

    def paragraph(self, text: str, *, raw: bool = False) -> None:
        """`text`, escaped unless `raw` (the report's own markdown: a list item, say)."""
        self.md += [text if raw else md_text(text), ""]
        if raw and text.startswith("- "):
            self.body.append(f"<ul><li>{escape(text.removeprefix('- '))}</li></ul>")
        else:
            self.body.append(f"<p>{escape(text)}</p>")

    def table(self, title: str, table: pd.DataFrame) -> None:
        self.md += [f"**{title}**", "", markdown_table(table), ""]
        columns, numeric, values = displayed(table)  # a timing with its range as one column
        align = [' class="n"' if n else "" for n in numeric]  # numbers right, text left
        head = "".join(f"<th{a}>{escape(c)}</th>" for c, a in zip(columns, align, strict=True))
        rows = "".join(
            "<tr>"
            + "".join(f"<td{a}>{escape(v)}</td>" for a, v in zip(align, row, strict=True))
            + "</tr>"
            for row in values
        )
        self.body.append(f"<p><b>{escape(title)}</b></p>")
        self.body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")

    def image(self, title: str, name: str, png: bytes) -> None:
        self.md += [f"![{title}]({name})", ""]
        data = base64.b64encode(png).decode()
        self.body.append(f'<p><img alt="{escape(title)}" src="data:image/png;base64,{data}"></p>')

    def markdown(self) -> str:
        return "\n".join([f"# {self.title}", "", *self.md])

    def html(self) -> str:
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.n{text-align:right}"
            "blockquote{border-left:4px solid #e0a000;margin:0;padding:0 1em}"
            "img{max-width:100%}"
        )
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(self.title)}'
            f"</title><style>{style}</style></head><body>\n<h1>{escape(self.title)}</h1>\n"
            + "\n".join(self.body)
            + "\n</body></html>\n"
        )
