"""Energy per epoch, read where the hardware counts it (docs/energy.md).

A counter is read twice an epoch, at the synchronised boundaries where its wall clock starts
and stops (`engine.train_one_epoch`), never inside a step. On an NVIDIA GPU (Volta and
later) it is NVML's total energy of the device, through nvidia-ml-py (the `gpu` extra); on a
CPU, the kernel's RAPL counters of its packages (`/sys/class/powercap`), where readable.
Elsewhere there is none, and the run says why: nothing is estimated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MJ, UJ = 1e-3, 1e-6  # joules per unit of NVML's counter (mJ) and of RAPL's (µJ)
POWERCAP = Path("/sys/class/powercap")


class EnergyCounter:
    """A cumulative energy counter over one or more domains (a GPU; a CPU's packages), read
    as raw integers that may wrap: `joules()` is the energy counted since it was made."""

    def __init__(
        self,
        source: str,
        read: Callable[[], Sequence[int]],
        unit_j: float,
        wraps_at: Sequence[int | None],
    ) -> None:
        self.source = source  # what counts, in words (tagged on the run)
        self._read, self._unit_j, self._wraps_at = read, unit_j, wraps_at
        self._last = list(read())  # fails here, once, where the hardware has no counter
        self._units = 0

    def joules(self) -> float:
        """Joules since this counter was made. A domain whose reading fell since the last one
        wrapped (at its `wraps_at`) once in between: read at least once per wrap."""
        now = list(self._read())
        for before, after, wrap in zip(self._last, now, self._wraps_at, strict=True):
            self._units += after - before + (wrap if after < before and wrap else 0)
        self._last = now
        return self._units * self._unit_j


# What a device's counter is found by: a counter, or why there is none (one clause).
Finder = Callable[[torch.device], "EnergyCounter | str"]


def nvml_counter(device: torch.device) -> EnergyCounter | str:
    """NVML's total energy of `device` (mJ since the driver loaded), matched by PCI bus."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install 'cifarexp[gpu]')"
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        return EnergyCounter(
            f"NVML total energy of {name} ({bus})",
            lambda: [pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)],
            MJ,
            [None],  # 64 bits of mJ: it does not wrap
        )
    except pynvml.NVMLError as exc:
        return f"NVML has no energy counter for this GPU ({exc}; Volta and later have one)"
    except AttributeError:  # a torch without the PCI ids of its devices
        return f"torch {torch.__version__} does not say which PCI bus the GPU is on"


def rapl_counter(device: torch.device, root: Path = POWERCAP) -> EnergyCounter | str:
    """The RAPL energy of the CPU's packages (`intel-rapl:N`, AMD's included), summed, each
    wrapping at its max_energy_range_uj."""
    packages = [
        folder
        for folder in sorted(root.glob("intel-rapl:*"))
        if folder.name.count(":") == 1 and _text(folder / "name").startswith("package")
    ]
    if not packages:
        return f"no RAPL package counter in {root} (a VM, or a container without powercap)"
    names = ", ".join(_text(p / "name") for p in packages)
    try:
        return EnergyCounter(
            f"RAPL {names}",
            lambda: [int(_text(p / "energy_uj")) for p in packages],
            UJ,
            [int(_text(p / "max_energy_range_uj")) for p in packages],
        )
    except PermissionError:
        return f"the RAPL counters in {root} are readable by root only"
    except (OSError, ValueError) as exc:
        return f"the RAPL counters in {root} cannot be read ({exc})"


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


# device type -> how its counter is found; a test registers its own for "cpu".
FINDERS: dict[str, Finder] = {"cuda": nvml_counter, "cpu": rapl_counter}


def find_counter(device: torch.device, processes: int = 1) -> EnergyCounter | str:
    """The energy counter of `device`, or why there is none. With several processes on CPUs
    there is none: RAPL counts the whole machine, which they share."""
    finder = FINDERS.get(device.type)
    if finder is None:
        return f"no energy counter is known for {device.type} devices"
    if device.type == "cpu" and processes > 1:
        return f"RAPL counts the whole machine, which {processes} processes share"
    return finder(device)


def joules_text(joules: float) -> str:
    """Energy as the study writes it: "55,210 J", "312 J", "4.1 J"."""
    return f"{joules:,.0f} J" if joules >= 10 else f"{joules:.2g} J"
