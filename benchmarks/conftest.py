"""Prints the ratio table of the op benchmarks at the end of the session."""

import pytest

RESULTS: dict = {}  # (op, device, dtype, numel) -> {variant: median seconds}


@pytest.fixture(scope="session")
def ratio_table():
    yield RESULTS
    if not RESULTS:
        return
    lines = ["", "op benchmarks: median time, and speedup of the fused backend over each baseline"]
    for (op, device, dtype, numel), times in sorted(RESULTS.items()):
        fused = {k: v for k, v in times.items() if k not in ("eager", "compile")}
        for backend, t in fused.items():
            parts = [f"{op:17s} {device:4s} {dtype:9s} {numel:>10d} {backend:6s} {t * 1e3:8.3f} ms"]
            for base in ("eager", "compile"):
                if base in times:
                    parts.append(f"{times[base] / t:5.2f}x vs {base}")
            lines.append("  ".join(parts))
    print("\n".join(lines))
