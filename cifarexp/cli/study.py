"""The commands that answer from the model and the store: inspect (Q1-Q4), report, lab
(the whole study from nothing to every answer), compare (your study beside another) and ui
(MLflow's UI on the store)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cifarexp.cli import options as opt
from cifarexp.cli.base import answer, command, open_session, parse_list
from cifarexp.config import OPTIMIZERS, CifarexpError, TrainConfig, UserError

if TYPE_CHECKING:
    from analysis.compare import Comparison, Source
    from cifarexp.study.session import Session

D = TrainConfig()  # the study's defaults, shown by --help


@command("inspect")
def inspect_(
    ctx: typer.Context,
    optimizers: opt.Optimizers = "sgd,adam",
    batch_norm: opt.BatchNorm = True,
    batch_size: opt.StepImages = 8,
    seed: opt.Seed = D.seed,
    as_json: opt.Json = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
) -> None:
    """Q1-Q4: conv layers, the last linear layer's input, parameters, gradients, optimizer state."""
    names = parse_list("optimizers", optimizers, OPTIMIZERS)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=batch_size,
        batch_size=batch_size,
        workers=0,
        device="cpu",
        seed=seed,
        batch_norm=batch_norm,
    )
    session = open_session(ctx)
    from cifarexp.cli.console import console, inspection_tables, print_where
    from cifarexp.study import inspection

    result = inspection.run_inspection(cfg, tuple(names), session)
    if as_json:
        typer.echo(result.json())
        return
    for shown in inspection_tables(result):
        console.print(shown)
    console.print(
        f"Logged as run {result.run_id} (model_summary.txt, tables as CSV, answers.json)."
    )
    print_where(result.run_id)


@command("report")
def report_(
    ctx: typer.Context,
    out: opt.Out = Path("report"),
    runs: opt.Runs = None,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
) -> None:
    """The study's tables and plots, from the tracking store, into a report folder."""
    session = open_session(ctx)
    check_out(out, session)
    from analysis import report

    run_ids = report.pick_runs(parse_list("runs", runs)) if runs is not None else {}
    write_and_log_report(report.build_report(run_ids), out, session, quiet=quiet)


@command("lab")
def lab_(
    ctx: typer.Context,
    preset: opt.PresetName = "full",
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    device: opt.Device = D.device,
    out: opt.Out = Path("report"),
    profile: opt.Profile = D.profile,
    seed: opt.Seed = D.seed,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """The whole study, from nothing to every answer: inspect, time, sweep-workers,
    compare-device, compare-optim, no-bn (with the best worker count), then the report."""
    base = TrainConfig(
        dataset=dataset, data_dir=data_dir, device=device, profile=profile, seed=seed
    )
    session = open_session(ctx)
    check_out(out, session)  # a bad --out fails now, not after the whole study
    from analysis import report
    from cifarexp.cli.console import console, print_where
    from cifarexp.study import lab

    for step in lab.steps(base, preset, session):
        console.rule(step.title)
        run_id = step.run()
        if step.answered:  # logged on its run now: a later step may read it (the best count)
            answer(session, step.item, run_id, show=False)
        print_where(run_id, ui=False)  # the report's, at the end, says how to open the UI
    write_and_log_report(report.build_report(), out, session, quiet=quiet)


@command("compare")
def compare_(
    ctx: typer.Context,
    baseline: opt.BaselineSource,
    fail_if_slower: opt.FailIfSlower = None,
    out: opt.CompareOut = Path("compare"),
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
) -> None:
    """Your study beside a baseline study (another store, an experiment, run ids), figure by
    figure, within noise or not; with --fail-if-slower, a regression check for CI."""
    from analysis import compare

    source = compare.parse_source(baseline)
    threshold = compare.parse_threshold(fail_if_slower) if fail_if_slower is not None else None
    session = open_session(ctx)
    check_out(out, session, "the comparison")
    from cifarexp.cli.console import console, print_comparison

    result = compare.compare(compare.read_baseline(source), compare.latest("yours"))
    try:
        path = compare.write(result, out, threshold)
    except OSError as exc:
        raise _unwritable(out, exc, "the comparison") from None
    print_comparison(result, threshold, quiet=quiet)
    console.print(f"Comparison written to {path}.")
    log_comparison(session, result, out, source, threshold)
    if result.slower(threshold):
        raise typer.Exit(1)


@command("ui")
def ui_(
    port: opt.Port = None,
    tracking_uri: opt.TrackingUri = None,
) -> None:
    """The MLflow UI on the store the commands use, on 127.0.0.1, until Ctrl-C: prints the
    link to each experiment's runs."""
    from cifarexp import processes
    from cifarexp.cli.console import console, show_notices
    from cifarexp.tracking import ui
    from cifarexp.tracking.store import open_store, redact

    show_notices()
    uri = open_store(tracking_uri)
    if ui.is_server(uri):  # a tracking server serves its own UI
        console.print(f"{redact(uri)} is a tracking server: its UI is there.", highlight=False)
        for line in ui.experiment_links(redact(uri).rstrip("/")):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        return
    port = ui.free_port(port)
    server = None
    try:
        server = ui.start(uri, port)  # stops what it started if it fails or is stopped
        console.print(
            f"The MLflow UI on {redact(uri)}: {server.url} (Ctrl-C stops it)",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        links = ui.experiment_links(server.url)
        for line in links or ["No experiment yet: run a command (`cifarexp lab`, say) first."]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        console.print(
            f"On a remote machine, forward the port first: ssh -L {server.port}:{ui.HOST}:"
            f"{server.port} HOST",
            style="dim", highlight=False, soft_wrap=True,
        )  # fmt: skip
        code = server.process.wait()
        raise CifarexpError(f"the MLflow UI stopped by itself (exit status {code}): "
                            f"{server.tail()}")  # fmt: skip
    except KeyboardInterrupt as stop:  # Ctrl-C: what ends it (exit 0; another signal 128+N)
        if server is not None:
            server.stop()
        console.print("The MLflow UI is stopped.", highlight=False)
        if processes.signal_name(stop) != "SIGINT":
            raise typer.Exit(processes.exit_code(stop)) from None
    finally:
        if server is not None:
            server.stop()


def log_comparison(
    session: Session, result: Comparison, out: Path, source: Source, threshold: float | None
) -> None:
    """The comparison as its own run: the table, the folder's plots and compare.md, the
    verdict as its description."""
    from cifarexp.cli.console import print_where
    from cifarexp.study.catalogue import Labels
    from cifarexp.tracking import redact

    labels = Labels("compare", "compare")
    params = {"baseline": source.shown, "fail_if_slower": threshold, "out": str(out)}
    with session.tracker.start_run(
        session.experiment_of("compare"), run_name=f"compare with {redact(source.text)}"[:200],
        tags=labels.tags(), params=params, about=labels.about(),
    ) as run_id:  # fmt: skip
        session.tracker.log_artifacts(out)
        session.tracker.log_table(result.table(), "comparison")
    if run_id is not None:
        session.tracker.describe(run_id, result.description(threshold))
    print_where(run_id)


def check_out(out: Path, session: Session, what: str = "the report") -> None:
    """Whether `what` (the report, a comparison) can be written to `out`
    (`folder.check_out`), before anything runs: the store's own folders are no place for it."""
    from analysis import folder
    from cifarexp import tracking

    store = tracking.artifact_root(session.tracker.uri)
    try:
        folder.check_out(out, [] if store is None else [store])
    except OSError as exc:
        raise _unwritable(out, exc, what) from None


def _unwritable(out: Path, exc: OSError, what: str = "the report") -> UserError:
    return CifarexpError(f"cannot write {what} to {out} ({exc.strerror})", "out")


def write_and_log_report(sections: list, out: Path, session: Session, *, quiet: bool) -> None:
    """Write the report folder, print it (unless `quiet`), and log the folder on a `report`
    run in the session's experiment (else the report's own)."""
    from analysis import report
    from cifarexp import tracking
    from cifarexp.cli.console import console, print_section, print_where
    from cifarexp.study.catalogue import Labels, description

    try:
        path = report.write_report(sections, out, tracking.shown_uri())
    except OSError as exc:
        raise _unwritable(out, exc) from None
    for section in [] if quiet else sections:
        if section.missing:
            console.print(f"[bold]{section.heading}[/]: not run yet; run `{section.command}`.")
        else:
            print_section(section)
    labels = Labels("report", "report")
    # the worker count a lab's later steps took from its sweep is no setting of the report
    session.tracker.later_tags.pop(tracking.WORKERS_FROM, None)
    with session.tracker.start_run(
        session.experiment_of("report"), run_name="report", tags=labels.tags(),
        params={"out": str(out)}, about=labels.about(),
    ) as run_id:  # fmt: skip
        session.tracker.log_artifacts(out)
    if run_id is not None:
        text = report.report_description(sections)
        session.tracker.describe(run_id, description("report", text, {"out": str(out)}))
    console.print(f"Report written to {path}.")
    print_where(run_id)
