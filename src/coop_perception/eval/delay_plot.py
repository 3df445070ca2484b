"""AP against mean latency for every fusion method of an `eval fusion` result (PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METRICS = {'ap30': 'AP@0.3', 'ap50': 'AP@0.5', 'ap70': 'AP@0.7'}


def plot_delay_sweep(result: dict, path, metric: str = 'ap70') -> Path:
    """One line per method of ``result`` (evaluate_fusion's dict): ``metric`` in % against the
    mean latency (ms); methods without delay are drawn dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = list(dict.fromkeys(r['method'] for r in result['results']))
    for method in methods:
        rows = [r for r in result['results'] if r['method'] == method and r[metric] is not None]
        delays = [r['delay_ms'] for r in rows]
        flat = len({r[metric] for r in rows}) == 1 and len(rows) > 1
        ax.plot(delays, [100 * r[metric] for r in rows], '--' if flat else '-o', label=method, markersize=4)
    ax.set_xlabel('mean V2X latency (ms)')
    ax.set_ylabel(f"{result['headline_class']} {METRICS[metric]} (%)")
    ax.set_title(f"{result['channel']} latency channel, seed {result['seed']}, within {result['max_range_m']:g} m")
    ax.grid(alpha=0.3)
    ax.legend(loc='lower left', fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
