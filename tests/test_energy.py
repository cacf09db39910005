"""Energy per epoch: a counter read at each epoch's boundaries (registered fakes here: the
test machines have no readable one), what the store and the study's tables hold, and a
missing counter said once."""

import itertools
import sys
from types import SimpleNamespace

import pytest
import torch

from analysis import report, tables
from benchmarks.fake_runs import epoch, log_run, partial
from cifarexp import tracking
from cifarexp.training import energy
from cifarexp.training.data import load_split, make_loader
from cifarexp.training.energy import UJ, EnergyCounter, rapl_counter
from cifarexp.training.engine import train_one_epoch
from cifarexp.training.models import build_model
from cifarexp.training.optim import build_optimizer
from tests.conftest import TINY, TINY_ARGS, all_runs, without

ENERGY_METRICS = {"energy_j", "power_w", "energy_per_image_mj"}


def counting(step_j: float, wraps_at_j: float) -> EnergyCounter:
    """A counter in µJ, as RAPL's, each reading `step_j` above the last, wrapping at
    `wraps_at_j`."""
    raw = itertools.count(0, round(step_j / UJ))
    wrap = round(wraps_at_j / UJ)
    return EnergyCounter("a fake counter", lambda: [next(raw) % wrap], UJ, [wrap])


def test_the_rapl_counter_sums_the_packages_and_counts_through_a_wrap(tmp_path):
    # Given a powercap folder with two packages (one about to wrap at 1 J), a core domain
    # inside one and a platform domain beside them
    def domain(name, folder, uj, wraps_at):
        path = tmp_path / folder
        path.mkdir()
        (path / "name").write_text(f"{name}\n")
        (path / "energy_uj").write_text(f"{uj}\n")
        (path / "max_energy_range_uj").write_text(f"{wraps_at}\n")
        return path / "energy_uj"

    zero = domain("package-0", "intel-rapl:0", 900_000, 1_000_000)
    one = domain("package-1", "intel-rapl:1", 5_000_000, 10**12)
    domain("core", "intel-rapl:0:0", 0, 10**12)
    domain("psys", "intel-rapl:2", 0, 10**12)
    counter = rapl_counter(torch.device("cpu"), tmp_path)
    # When package 0 counts 0.3 J through its wrap and package 1 counts 2 J
    zero.write_text("200000\n")
    one.write_text("7000000\n")
    # Then the counter read 2.3 J from the packages alone
    assert counter.source == "RAPL package-0, package-1"
    assert counter.joules() == pytest.approx(2.3)
    # and a folder without packages has no counter, and says why
    assert "no RAPL package counter" in rapl_counter(torch.device("cpu"), tmp_path / "x")


def test_the_nvml_counter_reads_the_gpus_total_energy_found_by_its_pci_bus(monkeypatch):
    # Given nvidia-ml-py (a stand-in) whose GPU on PCI bus 19 has counted 5,000 mJ, then
    # 12,500, and a CUDA device on that bus
    readings = iter([5_000, 12_500])

    class NVMLError(Exception):
        pass

    def total_energy(handle):
        if handle != b"00000000:19:00.0":
            raise NVMLError("Not Found")
        return next(readings)

    nvml = SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByPciBusId=lambda b: b,
        nvmlDeviceGetName=lambda handle: "NVIDIA H200",
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    bus = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x19, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: bus)
    gpu = torch.device("cuda", 0)
    # When its counter is found and read
    counter = energy.nvml_counter(gpu)
    # Then it names the GPU and counts 7.5 J
    assert counter.source == "NVML total energy of NVIDIA H200 (00000000:19:00.0)"
    assert counter.joules() == pytest.approx(7.5)

    # and a GPU without the counter, or no nvidia-ml-py, gives a reason
    def unsupported(handle):
        raise NVMLError("Not Supported")

    nvml.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert energy.nvml_counter(gpu) == (
        "NVML has no energy counter for this GPU (Not Supported; Volta and later have one)"
    )
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert energy.nvml_counter(gpu).startswith("nvidia-ml-py is not installed")


def test_an_epoch_cut_short_logs_the_energy_it_measured_and_estimates_the_whole_epochs():
    # Given a tiny set of two batches and a counter that counts 3 J between two readings
    model = build_model()
    loader = make_loader(TINY, load_split(TINY, train=True), train=True)
    optimizer = build_optimizer(TINY.optimizer, model.parameters())
    # When one epoch trains its first batch only, read by that counter
    result = train_one_epoch(
        model, loader, optimizer, torch.device("cpu"), epoch=1, max_batches=1,
        energy=counting(3.0, 10.0),
    )  # fmt: skip
    # Then it logs the 3 J as partial_energy_j, and as energy_j the whole epoch's estimate,
    # scaled as its time is
    metrics = result.metrics()
    assert metrics["partial_energy_j"] == pytest.approx(3.0)
    scale = metrics["epoch_time_s"] / metrics["partial_total_s"]
    assert metrics["energy_j"] == pytest.approx(3.0 * scale)
    assert metrics["power_w"] == pytest.approx(3.0 / metrics["partial_total_s"])
    assert metrics["energy_per_image_mj"] == pytest.approx(3000 / TINY.batch_size)


def test_each_epoch_logs_the_energy_its_counter_counted_and_the_c2_table_shows_it(
    cli, client, monkeypatch
):
    # Given a CPU whose counter counts 7 J between two readings and wraps at 10 J
    monkeypatch.setitem(energy.FINDERS, "cpu", lambda device: counting(7.0, 10.0))
    # When a tiny run trains two epochs
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    # Then each epoch logged the 7 J it counted (the wrap included), its power and its
    # energy per image, and the run names its counter
    [run] = all_runs(client)
    history = tracking.metric_history(run.info.run_id, ["epoch_time_s", *ENERGY_METRICS])
    assert list(history["energy_j"]) == pytest.approx([7.0, 7.0])
    assert list(history["power_w"]) == pytest.approx(list(7.0 / history["epoch_time_s"]))
    assert list(history["energy_per_image_mj"]) == pytest.approx([7000 / TINY.train_size] * 2)
    assert run.data.tags[tracking.ENERGY] == "a fake counter"
    # and C2's table (printed) and answer (the run's description) carry it
    shown = " ".join(result.output.split())
    assert "energy J" in shown and "power W" in shown
    assert "It used 7 J (" in run.data.tags[tracking.NOTE]


def test_a_device_without_a_counter_logs_no_energy_and_says_why_once(cli, client, monkeypatch):
    # Given a CPU without an energy counter
    monkeypatch.setitem(energy.FINDERS, "cpu", lambda device: "this test's CPU has none")
    # When a comparison trains two variants on it
    result = cli("compare-optim", *without("--epochs"), "--epochs", "1",
                 "--optimizers", "sgd,adam")  # fmt: skip
    assert result.exit_code == 0, result.output
    # Then no run logged an energy metric, each says why in a tag, and the terminal once
    children = [r for r in all_runs(client) if tracking.VARIANT in r.data.tags and
                r.data.tags[tracking.VARIANT]]  # fmt: skip
    assert len(children) == 2
    for run in children:
        assert not ENERGY_METRICS & set(run.data.metrics)
        assert run.data.tags[tracking.ENERGY] == "not measured: this test's CPU has none"
    notice = "Energy per epoch is not measured: this test's CPU has none."
    assert " ".join(result.output.split()).count(notice) == 1
    assert "J/epoch" not in result.output


def energy_epoch(seconds: float, joules: float, acc: float = 0.3) -> dict[str, float]:
    return {**epoch(0.1, seconds - 0.5, seconds, 2.0, acc), "energy_j": joules,
            "power_w": joules / seconds, "energy_per_image_mj": joules / 50}  # fmt: skip


def test_c5_compares_the_devices_energy_and_c6_the_optimizers(client):
    # Given a C5 whose CPU (its epoch estimated from some batches) used 20,000 J an epoch
    # and whose GPU used 1,000 J, and a C6 whose optimizers used 900 and 1,100 J
    e = client.create_experiment("c5")
    c5 = log_run(client, e, command="compare-device", exercise="C5")
    cpu = partial(energy_epoch(10.0, 1000.0), whole_epoch_s=200.0)
    log_run(client, e, command="compare-device", exercise="C5", variant="device=cpu",
            params={"device": "cpu"}, parent_id=c5, device="cpu",
            epochs=[{**cpu, "energy_j": 20_000.0, "partial_energy_j": 1000.0}])  # fmt: skip
    log_run(client, e, command="compare-device", exercise="C5", variant="device=cuda",
            params={"device": "cuda"}, parent_id=c5,
            epochs=[energy_epoch(5.0, 1000.0)] * 2)  # fmt: skip
    e = client.create_experiment("c6")
    c6 = log_run(client, e, command="compare-optim", exercise="C6")
    for name, joules in (("sgd", 900.0), ("adam", 1100.0)):
        log_run(client, e, command="compare-optim", exercise="C6", variant=f"optimizer={name}",
                params={"optimizer": name}, parent_id=c6,
                epochs=[energy_epoch(5.0, joules)] * 2)  # fmt: skip
    # When their sections are built
    devices, optimizers = report.summarize("C5", c5), report.summarize("C6", c6)
    # Then C5 has each device's J/epoch and the GPU's 20x less as a headline, in its answer
    table = devices.tables["c5_devices"]
    assert list(table[tables.EPOCH_J]) == pytest.approx([20_000.0, 1000.0])
    assert list(table[tables.ENERGY_VS_CPU]) == pytest.approx([1.0, 20.0])
    assert devices.metrics() == pytest.approx({"gpu_speedup": 40.0, "cpu_gpu_energy_ratio": 20.0})
    assert "Energy per epoch: cpu 20,000 J, cuda 1,000 J (20.0x less than the CPU's)." in (
        devices.answer
    )
    # and C6 each optimizer's
    assert list(optimizers.tables["c6_optimizers"][tables.EPOCH_J]) == pytest.approx([900, 1100])
    assert "epoch_j_adam" not in optimizers.metrics()  # on its child, as avg_energy_j
    assert "Energy per epoch: sgd 900 J, adam 1,100 J." in optimizers.answer
