"""The sharded bench's table, its targets (issue 16, ratios within the run) and its chart."""
from __future__ import annotations

from .report import target_lines

READER_THREADS = 4        # pyckpt's helper threads (sysio._HelperPool)


def _m(data: dict, key: str) -> float | None:
    fig = data["figures"].get(key)
    return None if fig is None else fig["median"]


def _min(data: dict, *keys: str) -> float | None:
    found = [v for v in (_m(data, k) for k in keys) if v]
    return min(found) if found else None


def dcp_save(data: dict, prefix: str) -> float | None:
    """DCP's best save: the faster of 1 and 4 writer threads."""
    return _min(data, f"{prefix}.dcp.save_t1", f"{prefix}.dcp.save_t4")


def _per_rank(data: dict, key: str, field: str) -> list | None:
    per = data["values"].get(f"{key}.per_rank")
    return None if per is None else [r[field] for r in per]


def rows(data: dict) -> list[dict]:
    """Each figure with its spread, the limit it is compared with and DCP's same figure."""
    out = []
    for kind in data["meta"]["states"]:
        for n in data["meta"]["ranks"]:
            p = f"{kind}.n{n}"
            for lim in ("copy", "write_direct", "write_fdatasync", "read_cold", "read_direct"):
                out.append(_row(data, f"{p}.limit.{lim}", None, None))
            read = _min(data, f"{p}.limit.read_cold", f"{p}.limit.read_direct")
            out += [_row(data, f"{p}.pyckpt.save", _m(data, f"{p}.limit.write_direct"), dcp_save(data, p)),
                    _row(data, f"{p}.dcp.save_t1", _m(data, f"{p}.limit.write_direct"), None),
                    _row(data, f"{p}.dcp.save_t4", _m(data, f"{p}.limit.write_direct"), None),
                    _row(data, f"{p}.dcp.plan_t1", None, None), _row(data, f"{p}.dcp.plan_t4", None, None),
                    _row(data, f"{p}.dcp.get_state_dict", None, None),
                    _row(data, f"{p}.pyckpt.async_blocked", _m(data, f"{p}.limit.copy"),
                         _m(data, f"{p}.dcp.async_blocked")),
                    _row(data, f"{p}.dcp.async_blocked", _m(data, f"{p}.limit.copy"), None),
                    _row(data, f"{p}.pyckpt.restore_cold", read, _m(data, f"{p}.dcp.restore_cold")),
                    _row(data, f"{p}.dcp.restore_cold", read, None)]
            for m in data["meta"]["ranks"]:
                if m != n:
                    q = f"{kind}.n{n}to{m}"
                    same = _m(data, f"{kind}.n{m}.pyckpt.restore_cold")
                    out += [_row(data, f"{q}.pyckpt.restore_cold", same, _m(data, f"{q}.dcp.restore_cold")),
                            _row(data, f"{q}.dcp.restore_cold", same, None)]
            plain = _min(data, f"{p}.plain.limit.read_cold", f"{p}.plain.limit.read_direct")
            out += [_row(data, f"{p}.plain.limit.read_cold", None, None),
                    _row(data, f"{p}.plain.limit.read_direct", None, None),
                    _row(data, f"{p}.plain.limit.read_fresh", None, None),
                    _row(data, f"{p}.plain.pyckpt.load", plain, None)]
    return [r for r in out if r is not None]


def _row(data: dict, key: str, limit: float | None, dcp: float | None) -> dict | None:
    fig = data["figures"].get(key)
    if fig is None:
        return None
    row = {"figure": key, "seconds": fig["median"], "spread": fig["spread"],
           "x_limit": fig["median"] / limit if limit else None, "x_dcp": fig["median"] / dcp if dcp else None}
    for field, name in (("write_bytes", "written"), ("read_bytes", "read"), ("rss_extra", "rss_extra"),
                        ("shard_read_bytes", "shard_read")):
        per = _per_rank(data, key, field)
        if per is not None:
            row[f"max_{name}_per_rank"] = max(per)
    return row


def targets(data: dict) -> list[dict]:
    """The issue's targets, each with the measured ratio (slowest rank) and whether this run meets it."""
    out: list[dict] = []

    def check(name, value, bound):
        if value is not None:
            out.append({"target": name, "value": round(value, 3), "bound": bound, "met": value <= bound})

    def ratio(a, b):
        return a / b if a is not None and b else None
    m = lambda k: _m(data, k)  # noqa: E731
    ranks = data["meta"]["ranks"]
    for n in ranks:
        p = f"large.n{n}"
        check(f"{n} ranks: durable save <= 1.15x O_DIRECT write", ratio(m(f"{p}.pyckpt.save"),
              m(f"{p}.limit.write_direct")), 1.15)
        check(f"{n} ranks: durable save <= 0.8x DCP's best", ratio(m(f"{p}.pyckpt.save"), dcp_save(data, p)), 0.8)
        check(f"{n} ranks: async stall <= 1.5x one copy", ratio(m(f"{p}.pyckpt.async_blocked"),
              m(f"{p}.limit.copy")), 1.5)
        check(f"{n} ranks: async stall <= 0.4x DCP async_save's", ratio(m(f"{p}.pyckpt.async_blocked"),
              m(f"{p}.dcp.async_blocked")), 0.4)
        check(f"{n} ranks: cold restore <= 1.2x the faster cold read", ratio(m(f"{p}.pyckpt.restore_cold"),
              _min(data, f"{p}.limit.read_cold", f"{p}.limit.read_direct")), 1.2)
        check(f"{n} ranks: cold restore <= 0.5x DCP's", ratio(m(f"{p}.pyckpt.restore_cold"),
              m(f"{p}.dcp.restore_cold")), 0.5)
        check(f"{n}-rank snapshot: plain-process load <= 1.25x the faster cold read",
              ratio(m(f"{p}.plain.pyckpt.load"), _min(data, f"{p}.plain.limit.read_cold",
                                                      f"{p}.plain.limit.read_direct")), 1.25)
        # What the hardware allows a loader that returns new tensors: the same read into new memory.
        check(f"{n}-rank snapshot: plain-process load <= 1.25x an O_DIRECT read into new memory",
              ratio(m(f"{p}.plain.pyckpt.load"), m(f"{p}.plain.limit.read_fresh")), 1.25)
        for metric in ("save", "restore_cold"):
            check(f"{n} ranks: {data['meta']['small_tensors']} small tensors {metric} <= 1.5x large",
                  ratio(m(f"small.n{n}.pyckpt.{metric}"), m(f"{p}.pyckpt.{metric}")), 1.5)
    for n in ranks:
        for k in ranks:
            if k != n:
                _reshard_targets(data, n, k, check, ratio)
    return out


def _reshard_targets(data: dict, n: int, k: int, check, ratio) -> None:
    q, v = f"large.n{n}to{k}", data["values"]
    restore = _m(data, f"{q}.pyckpt.restore_cold")
    check(f"{n} -> {k} ranks: restore <= 1.3x the same-N restore",
          ratio(restore, _m(data, f"large.n{k}.pyckpt.restore_cold")), 1.3)
    check(f"{n} -> {k} ranks: restore <= 0.35x DCP's", ratio(restore, _m(data, f"{q}.dcp.restore_cold")), 0.35)
    need, extra = v.get(f"large.n{k}.local_bytes"), v.get(f"{q}.edge_allowance")
    read = _per_rank(data, f"{q}.pyckpt.restore_cold", "read_bytes")
    if need and extra and read and any(read):
        check(f"{n} -> {k} ranks: bytes read per rank <= 1.05x needed + a piece per shard edge",
              max(r / (1.05 * b + e) for r, b, e in zip(read, need, extra)), 1.0)
    rss = _per_rank(data, f"{q}.pyckpt.restore_cold", "rss_extra")
    if need and rss:
        from pyckpt.shards import SHARD_PIECE
        check(f"{n} -> {k} ranks: peak extra RSS <= local state + 2 x piece x {READER_THREADS} threads",
              max(r / (b + 2 * SHARD_PIECE * READER_THREADS) for r, b in zip(rss, need)), 1.0)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(data: dict) -> str:
    meta, v = data["meta"], data["values"]
    sizes = "  ".join(f"{kind}: {v.get(f'{kind}.tensors')} tensors, " +
                      "/".join(f"{sum(v.get(f'{kind}.n{n}.local_bytes') or [0]) / 2**20:.0f}" for n in meta["ranks"])
                      + f" MiB over {'/'.join(map(str, meta['ranks']))} ranks" for kind in meta["states"])
    lines = [f"# {meta['command']}",
             f"# {meta['date']}  torch {meta['torch']}  {meta['cpus']} cpus  fs {meta['workdir_fs']}  "
             f"medians of {meta['repeat']} (slowest rank)  cache drop: {v.get('cache_drop_method')}"
             f" + {meta.get('settle', 0):g} s settle",
             f"# states (--size-gib {meta['size_gib']} each): {sizes}",
             f"{'figure':34} {'seconds':>8} {'spread':>6} {'x limit':>7} {'x dcp':>6} "
             f"{'MiB wr':>7} {'MiB rd':>7} {'MiB rss+':>8}  (max per rank)"]
    mib = lambda r, k: _fmt(r.get(k) / 2**20 if r.get(k) is not None else None, "7.1f")  # noqa: E731
    for r in data["rows"]:
        lines.append(f"{r['figure']:34} {r['seconds']:8.3f} {r['spread']:6.0%} {_fmt(r['x_limit'], '7.2f')} "
                     f"{_fmt(r['x_dcp'], '6.2f')} {mib(r, 'max_written_per_rank')} {mib(r, 'max_read_per_rank')} "
                     f"{mib(r, 'max_rss_extra_per_rank'):>8}")
    firsts = [f"{k.split('.')[0]} {k.split('.')[1]} {v[k]:.3f} s" for k in sorted(v) if k.endswith("async_blocked_first")]
    if firsts:
        lines.append("first async snapshot of a job (one-time set-up, not in the medians): " + ", ".join(firsts))
    lines += target_lines(data["targets"], "issue 16")
    return "\n".join(lines)


def chart(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = data["meta"]["ranks"]
    panels = [("durable save", [("pyckpt", "pyckpt.save"), ("dcp t1", "dcp.save_t1"), ("dcp t4", "dcp.save_t4"),
                                ("O_DIRECT write", "limit.write_direct")]),
              ("async: training blocked", [("pyckpt", "pyckpt.async_blocked"), ("dcp", "dcp.async_blocked"),
                                           ("one copy", "limit.copy")]),
              ("cold restore, same N", [("pyckpt", "pyckpt.restore_cold"), ("dcp", "dcp.restore_cold"),
                                        ("cold read", "limit.read_cold"), ("O_DIRECT read", "limit.read_direct")])]
    kinds = data["meta"]["states"]
    fig, axes = plt.subplots(len(kinds), 4, figsize=(18, 4 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        for ax, (title, series) in zip(axes[row], panels):
            for label, metric in series:
                ys = [_m(data, f"{kind}.n{n}.{metric}") for n in ranks]
                if any(y is not None for y in ys):
                    ax.plot(ranks, ys, marker="o", linestyle="--" if "limit" in metric else "-", label=label)
            ax.set_title(f"{kind}: {title}")
            ax.set_xlabel("ranks")
            ax.set_ylabel("seconds (median, slowest rank)")
            ax.set_xticks(ranks)
            ax.legend(fontsize=7)
        ax = axes[row][3]
        pairs = [(n, k) for n in ranks for k in ranks if n != k]
        names = [f"{n}->{k}" for n, k in pairs]
        for offset, lib in ((-0.2, "pyckpt"), (0.2, "dcp")):
            ys = [_m(data, f"{kind}.n{n}to{k}.{lib}.restore_cold") or 0 for n, k in pairs]
            ax.bar([i + offset for i in range(len(pairs))], ys, width=0.4, label=lib)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(names)
        ax.set_title(f"{kind}: cold resharded restore N->M")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['meta']['command']}  ({data['meta']['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
