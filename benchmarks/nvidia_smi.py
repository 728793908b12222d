"""GPU clock, power and clock-limit samples from ``nvidia-smi`` in the background (no flags:
importable by every script and test)."""

from __future__ import annotations

import datetime
import subprocess
import threading

# Candidate nvidia-smi fields per quantity, newest name first (drivers rename and drop them).
_FIELDS = {
    "mhz": ["clocks.sm"],
    "watts": ["power.draw.instant", "power.draw"],
    "celsius": ["temperature.gpu"],
    "power_capped": ["clocks_event_reasons.sw_power_cap", "clocks_throttle_reasons.sw_power_cap"],
}


def supported_fields() -> dict[str, str]:
    """quantity -> the first of its candidate fields this nvidia-smi reports."""
    chosen = {}
    for quantity, names in _FIELDS.items():
        for name in names:
            run = subprocess.run(["nvidia-smi", f"--query-gpu={name}", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False)
            value = run.stdout.strip()
            if run.returncode == 0 and value and "Not Supported" not in value \
                    and "not a valid" not in value.lower():
                chosen[quantity] = name
                break
    return chosen


def parse_sample(line: str, quantities: list[str]) -> tuple[float, dict] | None:
    """One ``nvidia-smi --format=csv,noheader,nounits`` line of ``timestamp,<quantities>`` as
    (unix time, {quantity: float}); None for a line that is not one (a header, an error)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(quantities) + 1:
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None
    values = {}
    for quantity, text in zip(quantities, parts[1:]):
        if quantity == "power_capped":  # "Active" / "Not Active"
            values[quantity] = float(text == "Active")
        else:
            try:
                values[quantity] = float(text)
            except ValueError:  # "[N/A]"
                pass
    return stamp, values


class Sampler:
    """``nvidia-smi --query-gpu=timestamp,... -lms`` in the background; ``samples`` holds
    (unix time, {quantity: value}) rows, timed by nvidia-smi's own clock stamp."""

    def __init__(self, fields: dict[str, str], period_ms: int):
        self.quantities = list(fields)
        query = ",".join(["timestamp"] + [fields[q] for q in self.quantities])
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
             f"-lms={period_ms}"], stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            sample = parse_sample(line, self.quantities)
            if sample is not None:
                self.samples.append(sample)

    def between(self, start: float, end: float) -> list[dict]:
        return [values for stamp, values in list(self.samples) if start <= stamp <= end]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
