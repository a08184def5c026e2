"""The S3 bench's table and its targets (issue 19): pyckpt against the server's limit and DCP's fsspec path."""
from __future__ import annotations

from .report import target_lines
from .s3_ranks import DCP_THREADS

LIMIT_OF = {"save": "limit.upload", "async_durable": "limit.upload", "restore": "limit.download"}


def _m(data: dict, key: str) -> float | None:
    fig = data["figures"].get(key)
    return None if fig is None else fig["median"]


def dcp_best(data: dict, n: int, op: str) -> float | None:
    """DCP's best time for op (save, restore): the faster of its writer-thread counts."""
    found = [v for v in (_m(data, f"n{n}.dcp.{op}_t{t}") for t in DCP_THREADS) if v]
    return min(found) if found else None


def rows(data: dict) -> list[dict]:
    """Each figure: its seconds, spread, MB/s of the state, ratio to its limit, DCP's best over it,
    and the server's CPU seconds during it."""
    out = []
    for n in data["meta"]["ranks"]:
        out += [_row(data, n, f"limit.{op}", None, None) for op in ("upload", "download")]
        out += [_row(data, n, "pyckpt.save", "limit.upload", dcp_best(data, n, "save")),
                _row(data, n, "pyckpt.async_blocked", None, None),
                _row(data, n, "pyckpt.async_durable", "limit.upload", dcp_best(data, n, "save")),
                _row(data, n, "pyckpt.restore", "limit.download", dcp_best(data, n, "restore"))]
        for op in ("save", "restore"):
            out += [_row(data, n, f"dcp.{op}_t{t}", LIMIT_OF[op], None) for t in DCP_THREADS]
    return [r for r in out if r is not None]


def _row(data: dict, n: int, name: str, limit: str | None, dcp: float | None) -> dict | None:
    key = f"n{n}.{name}"
    fig = data["figures"].get(key)
    if fig is None:
        return None
    seconds, v = fig["median"], data["values"]
    limit_s = _m(data, f"n{n}.{limit}") if limit else None
    cpu = sorted(v.get(f"{key}.server_cpu") or [])
    return {"figure": key, "seconds": seconds, "spread": fig["spread"],
            "mb_per_s": v[f"n{n}.state_bytes"] / seconds / 1e6 if seconds and name != "pyckpt.async_blocked" else None,
            "limit": f"n{n}.{limit}" if limit else None, "x_limit": seconds / limit_s if limit_s else None,
            "dcp_over_this": dcp / seconds if dcp and seconds else None,
            "server_cpu_s": cpu[len(cpu) // 2] if cpu else None}


def targets(data: dict) -> list[dict]:
    """Issue 19's targets for each rank count: within 1.3x of the server's limit, 2x faster than DCP."""
    out = []

    def check(name: str, value: float | None, bound: float, lower_is_better: bool, note: str = "") -> None:
        if value is not None:
            out.append({"target": name, "value": round(value, 3), "bound": bound,
                        "met": value <= bound if lower_is_better else value >= bound, **({"note": note} if note else {})})

    for n in data["meta"]["ranks"]:
        for op, limit in (("save", "upload"), ("restore", "download")):
            mine, lim, dcp = _m(data, f"n{n}.pyckpt.{op}"), _m(data, f"n{n}.limit.{limit}"), dcp_best(data, n, op)
            check(f"{n} rank(s): {op} <= 1.3x the server's {limit} limit", mine / lim if mine and lim else None,
                  1.3, True)
            # No client beats the server's limit: DCP / limit is the most this ratio can be in this run.
            allows = f"the server's limit itself is {dcp / lim:.2f}x faster than DCP" if dcp and lim else ""
            check(f"{n} rank(s): {op} >= 2x faster than DCP via fsspec/s3fs (its best of {len(DCP_THREADS)})",
                  dcp / mine if mine and dcp else None, 2.0, False, allows)
    return out


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def table(data: dict) -> str:
    meta = data["meta"]
    sizes = {n: data["values"].get(f"n{n}.state_bytes", 0) for n in meta["ranks"]}
    lines = [f"# {meta['command']}",
             f"# {meta['date']}  torch {meta['torch']}  {meta['cpus']} cpus  server: {meta['server']} on 127.0.0.1 "
             f"(own processes)  client: {meta['client']}, parts {meta['part_size'] >> 20} MiB x{meta['parts_in_flight']}"
             f"  s3fs {meta['s3fs']}  state {max(sizes.values(), default=0) / 2**30:.2f} GiB  "
             f"medians of {meta['repeat']}",
             f"{'figure':28} {'seconds':>8} {'spread':>7} {'MB/s':>7} {'x limit':>8} {'DCP best/this':>13} "
             f"{'server CPU s':>12}  limit"]
    for r in data["rows"]:
        lines.append(f"{r['figure']:28} {r['seconds']:8.3f} {r['spread']:7.0%} {_fmt(r['mb_per_s'], '7.1f')} "
                     f"{_fmt(r['x_limit'], '8.2f')} {_fmt(r['dcp_over_this'], '13.2f')} "
                     f"{_fmt(r['server_cpu_s'], '12.2f')}  {r['limit'] or ''}")
    for n in meta["ranks"]:
        per = data["values"].get(f"n{n}.bytes_per_rank")
        if per:
            lines.append(f"{n} rank(s): bytes per rank: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    return "\n".join(lines + target_lines(data["targets"], "issue 19"))
