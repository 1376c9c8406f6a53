"""Timing helper shared by the benchmark scripts."""

import time


def paired_best_seconds(*functions, repeats: int) -> list[float]:
    """Best time of each function over `repeats` rounds, run alternately: interference on a shared machine only
    ever adds time, so the minimum is the most repeatable estimate, and alternating makes drifting load hit all
    of them alike."""
    for fn in functions:  # warm-up
        fn()
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
