"""`memkernels bench`: run the suites, then write their JSON, PNG plots and report.md into one folder."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import convergence, implicit, memory, plots, report, speed, theory_suite
from . import peers as peer_libraries

SUITES = report.SUITES
DEFAULT_SUITES = ("speed", "memory", "theory", "implicit")  # convergence takes minutes even at --quick: by name
MODES = ("quick", "full", "tiny")
MODULES = {"speed": speed, "memory": memory, "theory": theory_suite, "implicit": implicit, "convergence": convergence}


def configs(mode: str, *, device: str = "auto", backends: Sequence[str] | None = None, size: int | None = None,
            math_backend: str = "reference", peers: Sequence[str] | None = None) -> dict[str, Any]:
    """Each suite's configuration for a mode; size applies to the speed suite, backends and peers to the speed
    and memory suites, math_backend to the theory, implicit and convergence suites."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    speed_cfg = speed.SpeedConfig.preset(mode, device)
    memory_cfg = memory.MemoryConfig.preset(mode, device)
    if size is not None:
        if size < 1:
            raise ValueError(f"--size must be a positive number of parameters, got {size}")
        speed_cfg = dataclasses.replace(speed_cfg, large=size)
    if backends:
        speed_cfg = dataclasses.replace(speed_cfg, backends=tuple(backends))
        memory_cfg = dataclasses.replace(memory_cfg, backends=tuple(backends))
    if peers is not None:
        unknown = sorted(set(peers) - set(peer_libraries.LIBRARIES))
        if unknown:
            raise ValueError(f"peers must be chosen from {peer_libraries.LIBRARIES}, got {unknown}")
        speed_cfg = dataclasses.replace(speed_cfg, peers=tuple(peers))
        memory_cfg = dataclasses.replace(memory_cfg, peers=tuple(peers))
    return {"speed": speed_cfg, "memory": memory_cfg, "theory": theory_suite.TheoryConfig.preset(mode, math_backend),
            "implicit": implicit.ImplicitConfig.preset(mode, math_backend),
            "convergence": convergence.ConvergenceConfig.preset(mode, math_backend)}


def run_suite(suite: str, cfg: Any, mode: str, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run one suite with a progress bar on stderr; write its JSON and PNGs into out."""
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(desc=suite, unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        def total(n: int) -> None:  # a suite announces its total once, before its first tick
            bar.total = n
            bar.refresh()

        result = MODULES[suite].run(cfg, tick=bar.update, total=total)
    result["mode"] = mode
    result["seconds"] = time.perf_counter() - start
    report.write_json(result, out / f"{suite}.json")
    plots.DRAW[suite](report.clean(result), out)
    return result


def run(suites: Sequence[str], mode: str, out: str | Path, *, progress: bool = True, **options: Any) -> Path:
    """Run the suites in order into out (created if needed); returns the path of report.md."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"suites must be chosen from {SUITES}, got {list(suites)}")
    cfgs = configs(mode, **options)  # bad options fail before any suite runs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for suite in dict.fromkeys(suites):
        run_suite(suite, cfgs[suite], mode, out, progress=progress)
    path = out / "report.md"
    path.write_text(report.render(out))
    return path
