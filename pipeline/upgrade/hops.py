"""Each row's chain: the models it went through since it was last embedded from its image.

A row embedded (or re-embedded) by model m has chain "m" and 0 hops; mapped from m to n by a
transformation it has "m>n" and 1 hop, and so on. Errors of successive maps add up, so a row's
stored uncertainty (a log-variance) accumulates over its chain: the log-sum-exp of the steps'.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SEP = ">"


def stored_chains(b: pa.RecordBatch, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(chain, hops) of a stored batch's rows. Shards written before rows kept their chain
    derive it from `source`: "transform:a->b" is one hop from a; anything else is embedded."""
    n, names = b.num_rows, b.schema.names
    if "chain" in names and "hops" in names and not b.column("chain").null_count:
        chain = b.column("chain").to_numpy(zero_copy_only=False).astype(object)
        hops = pc.fill_null(b.column("hops"), 0).to_numpy(zero_copy_only=False)
        return chain, hops.astype(np.int64)
    chain = np.full(n, space, object)
    hops = np.zeros(n, np.int64)
    if "source" not in names:
        return chain, hops
    for i, s in enumerate(b.column("source").to_pylist()):
        s = s or ""
        if s.startswith("transform:") and "->" in s:
            a, z = s.removeprefix("transform:").split("->", 1)
            chain[i], hops[i] = f"{a}{SEP}{z}", 1
        elif ":" in s:
            chain[i] = s.split(":", 1)[1]
    return chain, hops


def extended(chain: np.ndarray, spaces: list[str]) -> np.ndarray:
    """Each chain with the spaces a transformation chain maps through appended."""
    if not spaces:
        return chain
    tail = SEP + SEP.join(spaces)
    return np.array([f"{c}{tail}" for c in chain], dtype=object)


def stored_log_var(b: pa.RecordBatch) -> np.ndarray | None:
    """The stored (accumulated) log-variance of each row, NaN where none; None without one."""
    if "uncertainty" not in b.schema.names:
        return None
    u = pc.fill_null(b.column("uncertainty"), np.nan).to_numpy(zero_copy_only=False)
    return np.asarray(u, dtype=np.float32)


def accumulated(prior: np.ndarray | None, step: np.ndarray | None) -> np.ndarray | None:
    """A chain's log-variance after one more map: log(exp(prior) + exp(step)). A row with no
    prior (NaN: embedded, or mapped by an h without an uncertainty head) keeps the step's; no
    step head keeps the prior, the only error known."""
    if step is None:
        return prior
    if prior is None:
        return step
    out = np.asarray(step, dtype=np.float32).copy()
    known = np.isfinite(prior) | (prior == np.inf)
    out[known] = np.logaddexp(prior[known], out[known])
    return out
