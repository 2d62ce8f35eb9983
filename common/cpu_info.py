"""Facts about this machine's CPU, read from the OS: a leaf module that the device setup, the CPU kernels' build
and the benchmark's header share."""
from __future__ import annotations

import os


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
