"""Shared helpers of the benchmark scripts: device description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def write_result(name: str, result: dict, out: str | None) -> Path:
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **result}
    path = Path(out) if out else Path(__file__).parent / "out" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
