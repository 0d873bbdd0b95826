"""Plain-text tables for the command line and the benchmark scripts, atomic JSON output, and the interleaved call
order the benchmarks compare alternatives with."""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading


def interleaved(items: list, configs: list, run_one) -> list[list]:
    """Run every config on every item, item by item, starting each item one config further along the list (config
    i % n first for item i): the machine's drift over a run then falls on every config alike, so ratios of their
    timings compare. `run_one(config, index, item)` -> a result; returns one list of results per config, in item
    order."""
    outs = [[] for _ in configs]
    for i, item in enumerate(items):
        start = i % len(configs) if configs else 0
        for c in list(range(start, len(configs))) + list(range(start)):
            outs[c].append(run_one(configs[c], i, item))
    return outs


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - len(str(int(abs(v)))), 1)}f}"
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> str:
    """A Markdown-compatible table (so the same text goes in the README)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]
    if title:
        out.insert(0, title)
    return "\n".join(out)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status); elsewhere set and
    restored under a lock, with a stricter mask in between, so another thread that creates a file meanwhile gets
    tighter permissions, never looser ones."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o777)
        os.umask(mask)
    return mask


def public_mode(path: str, folder: bool = False) -> None:
    """Give a temporary file or folder the permissions a plain open() or mkdir() would have given it (0666 or 0777
    less the umask): tempfile makes them private to the user, and the rename would keep that."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def write_json(path: str, data) -> str:
    """Write JSON atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def processor() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), or the platform's processor string."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "asimd", "sve", "sve2")


def vector_extensions() -> list[str]:
    """The vector extensions of the CPU that matter for matrix products (from /proc/cpuinfo's flags on Linux),
    in a fixed order; empty where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [v for v in VECTOR_FLAGS if v in have]
    except OSError:
        pass
    return []


def machine() -> str:
    import platform

    import jax
    ext = vector_extensions()
    return (f"{processor()} ({platform.machine()}{', ' + ' '.join(ext) if ext else ''}), {os.cpu_count()} cores, "
            f"{jax.devices()[0].platform}, jax {jax.__version__}")
