"""One merge in a child process, measured: wall time, peak RSS and its split.

Each merge of the overhead benchmark runs as its own child, so wall time and
peak resident set size (``ru_maxrss`` from ``wait4``) belong to that merge
alone; a sampler thread follows the child's anonymous and file-backed
resident memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence, Tuple

__all__ = ["run_merge", "warm_page_cache"]


class _RssSampler(threading.Thread):
    """Polls ``/proc/PID/status`` of a child: peak anonymous and file-backed resident bytes.

    ``ru_maxrss`` counts both; the split shows how much of a peak is clean,
    reclaimable file pages (memory-mapped safetensors) rather than memory the
    merge allocated. Sampled, so a peak shorter than the interval can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.status = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            try:
                text = self.status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)
            self.finished.wait(self.interval)


def run_merge(command: Sequence[str], out: Path) -> Tuple[float, int, int, int, float]:
    """Run one merge as a child: wall seconds, peak RSS, anonymous and file bytes, CPU seconds.

    The peak RSS is the child's ``ru_maxrss``; the split is sampled. Deletes the output.
    """
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as stream:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        sampler = _RssSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        sampler.finished.set()
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(
            f"{' '.join(command[:2])} failed ({code}); see the log:\n" + log.read_text()[-3000:]
        )
    shutil.rmtree(out)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss * 1024, sampler.peaks["RssAnon"], sampler.peaks["RssFile"], cpu


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every checkpoint file once so no merge pays for the first disk read.

    Inputs larger than the page cache are still partly read from disk by every merge.
    """
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as stream:
                while stream.read(1 << 24):
                    pass
