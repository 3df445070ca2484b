"""Plots of an `eval fusion` result (PNG): AP against the mean latency for every fusion method, and
AP against the bytes a collaborator frame costs for a sweep of sharing policies."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# raw scans (early fusion, ~800 kB a frame) would stretch the axis a hundredfold
_MAX_PLOTTED_BYTES = 100_000
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
    ax.grid(alpha=0.3)
    ax.legend(loc='lower left', fontsize=8, ncol=2)
    return _finish(fig, ax, result, metric, path)


def plot_bytes_sweep(result: dict, path, metric: str = 'ap70') -> Path:
    """``metric`` in % against the bytes per collaborator frame (log scale): one line per feature
    method, delay and sharing layout through its budgets (rows with ``sharing``,
    eval.fusion_eval.evaluate_sharing), one marker per delay for the other methods that send
    something (late fusion's box lists), ego only as a dotted level."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rows = [r for r in result['results'] if r[metric] is not None]
    swept = sorted({(r['method'], r['delay_ms'], r['sharing']) for r in rows if 'sharing' in r})
    delays = sorted({delay for _, delay, _ in swept})
    colours = {}
    for method, delay, layout in swept:
        # a budget too small for any ROI sends nothing, which a log axis cannot place
        line = sorted((r for r in rows if (r['method'], r['delay_ms'], r.get('sharing')) == (method, delay, layout)
                       and r['bytes_per_agent_frame'] > 0), key=lambda r: r['bytes_per_agent_frame'])
        colour = colours.setdefault((method, layout), f'C{len(colours)}')
        ax.plot([r['bytes_per_agent_frame'] for r in line], [100 * r[metric] for r in line],
                ('-o', '--s', ':^')[min(delays.index(delay), 2)], color=colour, markersize=4,
                label=f'{method} {layout}, {delay:.0f} ms')
    for r in rows:
        if 'sharing' in r or r['bytes_per_agent_frame'] > _MAX_PLOTTED_BYTES:
            continue
        if r['bytes_per_agent_frame'] > 0:
            ax.plot(r['bytes_per_agent_frame'], 100 * r[metric], 'D', markersize=6, color='black',
                    fillstyle='full' if r['delay_ms'] == rows[0]['delay_ms'] else 'none',
                    label=f"{r['method']}, {r['delay_ms']:.0f} ms")
        elif r['method'] == 'ego' and r['delay_ms'] == rows[0]['delay_ms']:
            ax.axhline(100 * r[metric], linestyle=':', color='grey', label='ego only')
    ax.axvline(1398, color='grey', linewidth=0.8, alpha=0.6)
    ax.text(1398, ax.get_ylim()[0], ' one ITS-G5 packet', fontsize=7, color='grey', va='bottom')
    ax.set_xscale('log')
    ax.set_xlabel('bytes per collaborator frame')
    ax.grid(alpha=0.3, which='both')
    ax.legend(loc='lower right', fontsize=7, ncol=2)
    return _finish(fig, ax, result, metric, path)


def _finish(fig, ax, result: dict, metric: str, path) -> Path:
    """The y label and title every plot of a result has; written to ``path``."""
    ax.set_ylabel(f"{result['headline_class']} {METRICS[metric]} (%)")
    ax.set_title(f"{result['channel']} latency channel, seed {result['seed']}, within {result['max_range_m']:g} m")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
