"""Facts about this machine's CPU, read from the OS: a leaf module that the device setup, the CPU kernels' build
and the header of the benchmark's and the OpenVINO profile's tables share. It imports nothing beyond the standard
library: the benchmark's timm workers, in a Python without Paddle, import it too."""
from __future__ import annotations

import os
import platform
from typing import List, Optional

# ISA extensions that decide which kernels a CPU math library can use, as /proc/cpuinfo names them
ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def cpu_field(name: str) -> str:
    """The value of the first /proc/cpuinfo line called ``name`` ('vendor_id', 'flags', ...); '' where there is
    none (no /proc/cpuinfo: not Linux)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.split(':', 1)[0].strip() == name), '')
    except OSError:
        return ''


def cpu_vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... ('' where /proc/cpuinfo does not say)."""
    return cpu_field('vendor_id')


def cpu_summary() -> dict:
    """The CPU model, the cores this process may use, and which ISA_FLAGS the CPU has and lacks (both lists empty
    where /proc/cpuinfo does not say)."""
    flags = set(cpu_field('flags').split())
    model = cpu_field('model name') or platform.processor() or 'unknown CPU'
    family = cpu_field('cpu family')
    if family:
        model += f" (family {family} model {cpu_field('model') or '?'})"
    return {'cpu_model': model, 'cpu_cores': cpu_cores(), 'cpu_flags': [f for f in ISA_FLAGS if f in flags],
            'cpu_flags_absent': [f for f in ISA_FLAGS if f not in flags] if flags else []}


def cpu_header(cpu: Optional[dict] = None) -> List[str]:
    """Two lines for the top of a table of timings: the CPU model and cores, and its ISA flags present and absent
    (``cpu``: a cpu_summary(), this machine's by default). Times compare only between machines these lines match."""
    cpu = cpu or cpu_summary()
    absent = ', '.join(cpu['cpu_flags_absent']) or ('-' if cpu['cpu_flags'] else 'unknown (no /proc/cpuinfo)')
    return [f"CPU: {cpu['cpu_model']}, {cpu['cpu_cores']} cores for this process",
            f"ISA: {' '.join(cpu['cpu_flags']) or '-'} (absent: {absent})"]
