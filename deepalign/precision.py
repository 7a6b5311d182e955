"""Which precision `auto` settings compute in: bf16 autocast where it is faster, fp32 elsewhere.

`train.bf16=auto` and `generation.dtype=auto` (on an fp32 model; the quickstart's sub-runs inherit both) ask
`bf16_decision(device)`:

- CUDA: bf16 where the GPU supports it (`torch.cuda.is_bf16_supported()`: Ampere and newer).
- CPU: bf16 only where a short probe measures it at least `SPEEDUP` times faster than fp32: a linear layer of
  SmolLM2's MLP shape (576 -> 1536, 256 rows), timed in fp32 and under bf16 autocast on one thread,
  interleaved for about a second, the fastest of each. The probe alone decides. The CPU's native-bf16
  flags (avx512_bf16, amx_bf16; ARM's bf16) are recorded beside it but do not decide: they say what the
  silicon can do, not which kernels this torch build dispatches to (`ONEDNN_MAX_CPU_ISA`, a build without
  AMX kernels). Without native bf16 (AVX2 only) a bf16 matmul is many times slower than fp32, and the probe
  says so. The result is cached in `<cache_dir>/precision/`, keyed by CPU model, CPU
  flags, torch version and those two variables (not the thread count: the probe runs on one thread).
- Anything else (mps): fp32.

`DEEPALIGN_CPU_BF16=1` or `0` sets the CPU's answer without probing (the test suite sets 0, so its numbers do
not depend on the machine). Explicit settings (`train.bf16=true|false`, `generation.dtype=bfloat16|float32`)
never ask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

log = logging.getLogger(__name__)

ENV_OVERRIDE = "DEEPALIGN_CPU_BF16"
# A probe speed-up on one linear layer shrinks on the whole model (casts, attention, sampling stay fp32):
# with AMX, 3x on the layer and about 1.7x on SmolLM2's generation. Below 1.5x bf16's rounding is not
# worth it.
SPEEDUP = 1.5
PROBE_SHAPE = (256, 576, 1536)  # rows, in, out: SmolLM2-135M's MLP up-projection on a batch of tokens
PROBE_SECONDS = 1.0
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
_DECIDED: dict[str, Precision] = {}  # per process: one probe per machine key
_LOGGED: set[str] = set()  # one log line per decision


@dataclass(frozen=True)
class Precision:
    """The `auto` decision for one device: bf16 autocast or fp32, and why."""

    bf16: bool
    device: str  # cpu | cuda | mps ...
    reason: str
    probe: dict[str, Any] | None = None  # fp32_ms, bf16_ms, threads, cached
    native: dict[str, Any] = field(default_factory=dict)  # the CPU's bf16 flags, for the record

    def describe(self) -> str:
        """One line for the log, e.g. `bf16 autocast on (probe: fp32 10.2 ms, bf16 5.9 ms)`."""
        state = "on" if self.bf16 else "off"
        if self.probe:
            fp32, bf16 = self.probe["fp32_ms"], self.probe["bf16_ms"]
            return f"bf16 autocast {state} (probe: fp32 {fp32} ms, bf16 {bf16} ms)"
        return f"bf16 autocast {state} ({self.reason})"

    def record(self) -> dict[str, Any]:
        """The `precision` entry of env.json."""
        return {"decision": "bf16" if self.bf16 else "fp32", **asdict(self)}


def default_cache_dir() -> Path:
    """`paths.cache_dir`'s default: $DEEPALIGN_CACHE, else $XDG_CACHE_HOME/deepalign or ~/.cache/deepalign."""
    if os.environ.get("DEEPALIGN_CACHE"):
        return Path(os.environ["DEEPALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "deepalign"


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and flags (Linux /proc/cpuinfo; elsewhere the platform's processor string)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("Features") or "").split()  # x86 / ARM
    return name, sorted(flags)


def native_bf16() -> dict[str, Any]:
    """What the CPU and torch say about native bf16: the cpuinfo flags and torch's own checks."""
    _, flags = _cpuinfo()
    out: dict[str, Any] = {flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16")}
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        out[name.strip("_")] = bool(check()) if check is not None else None
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def machine_key() -> dict[str, Any]:
    """What the CPU probe's result depends on."""
    name, flags = _cpuinfo()
    return {
        "cpu": name,
        "flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "torch": torch.__version__,
        **{k: os.environ.get(k) for k in KERNEL_ENV},
    }


def probe_cpu(seconds: float = PROBE_SECONDS) -> dict[str, float]:
    """Milliseconds of one linear layer (PROBE_SHAPE) in fp32 and under bf16 autocast, on one thread: the
    fastest of the rounds that fit in `seconds` (at least 3), the two interleaved so that a busy machine slows
    both alike. One thread: the ratio is the kernels', and a machine busy with other work disturbs it less."""
    rows, n_in, n_out = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(rows, n_in, generator=gen)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    began, rounds = time.perf_counter(), 0
    try:
        with torch.no_grad():
            while rounds <= 3 or time.perf_counter() - began < seconds:
                for name in best:  # round 0 warms up (kernel selection, allocation)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                        start = time.perf_counter()
                        layer(x)
                        elapsed = time.perf_counter() - start
                    if rounds:
                        best[name] = min(best[name], elapsed)
                rounds += 1
    finally:
        torch.set_num_threads(threads)
    return {"fp32_ms": round(best["fp32"] * 1e3, 3), "bf16_ms": round(best["bf16"] * 1e3, 3)}


def _cpu_decision(cache_dir: Path) -> Precision:
    native = native_bf16()
    forced = os.environ.get(ENV_OVERRIDE)
    if forced in ("0", "1"):
        return Precision(forced == "1", "cpu", f"{ENV_OVERRIDE}={forced}", native=native)
    key = machine_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "precision" / f"cpu-{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one probe per machine, even with several processes starting
        cached = path.is_file()
        if cached:
            probe = json.loads(path.read_text())["probe"]
        else:
            probe = probe_cpu()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "probe": probe}, indent=2) + "\n")
            tmp.replace(path)
    probe = {**probe, "threads": 1, "cached": cached}
    speedup = probe["fp32_ms"] / max(probe["bf16_ms"], 1e-9)
    bf16 = speedup >= SPEEDUP
    reason = f"cpu probe: bf16 {speedup:.2f}x the speed of fp32 ({'>=' if bf16 else '<'} {SPEEDUP}x)"
    return Precision(bf16, "cpu", reason, probe=probe, native=native)


def bf16_decision(device: torch.device | str, cache_dir: str | Path | None = None) -> Precision:
    """Whether `auto` computes in bf16 on `device` (see the module's docstring); logged once per process."""
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        reason = "cuda: bf16 supported" if supported else "cuda: this GPU has no bf16"
        decision = Precision(supported, "cuda", reason)
    elif device.type != "cpu":
        decision = Precision(False, device.type, f"{device.type}: fp32")
    else:
        memo = json.dumps([machine_key(), os.environ.get(ENV_OVERRIDE)], sort_keys=True)
        if memo not in _DECIDED:
            cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            _DECIDED[memo] = _cpu_decision(cache)
        decision = _DECIDED[memo]
    line = f"{decision.device}: {decision.describe()}"
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.info("precision: %s", decision.describe())
    return decision


def train_bf16(setting: bool | str, device: torch.device | str, cache_dir: str | Path | None = None) -> bool:
    """`train.bf16` (true | false | auto) as a bool."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"train.bf16: {setting!r} is not true, false or auto")
    return bf16_decision(device, cache_dir).bf16


def generation_autocast(
    dtype: str, model_dtype: torch.dtype, device: torch.device | str, cache_dir: str | Path | None = None
) -> torch.dtype | None:
    """The autocast dtype of `generation.dtype` for the HF engine, None for none: bfloat16 / float16 as
    given; float32 none; auto bf16 where `bf16_decision` says so and the weights are fp32, else none (the
    model's own dtype)."""
    if dtype in ("bfloat16", "float16"):
        return getattr(torch, dtype)
    if dtype == "auto" and model_dtype == torch.float32 and bf16_decision(device, cache_dir).bf16:
        return torch.bfloat16
    return None


def uses_auto(config) -> bool:
    """Whether a run's config leaves any precision to `auto` (then env.json records the decision)."""
    return config.train.bf16 == "auto" or config.generation.dtype == "auto"
