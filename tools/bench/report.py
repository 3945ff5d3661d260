"""Targets of issues 7 and 23 against the measured values, the text table, and the PNG chart."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .clients import MODES

KIB = 1024.0


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not math.isnan(float(x)) else float("nan")


# ----------------------------------------------------------------------------- throughput


def summarise_throughput(rounds: list[dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Median over rounds of each figure, and of each round's ratios (same-round baselines)."""
    out: dict[str, Any] = {}
    for mode in rounds[0]:
        out[mode] = {}
        for n in rounds[0][mode]:
            samples = [r[mode][n] for r in rounds if mode in r and n in r[mode]]

            def med(key: str, samples: list[dict[str, Any]] = samples) -> float:
                return statistics.median(_num(s[key]) for s in samples)

            def ratio(base: str, mode: str = mode, n: int = n) -> float:
                values = []
                for r in rounds:
                    b = r.get(base, {}).get(n, {}).get("rps")
                    v = r.get(mode, {}).get(n, {}).get("rps")
                    if b and v is not None:
                        values.append(v / b)
                return statistics.median(values) if values else float("nan")

            def cpu_total(sample: dict[str, Any]) -> float:
                return sum(v for v in sample["cpu_us_per_request"].values() if v is not None)

            def cpu_ratio(base: str, mode: str = mode, n: int = n) -> float:
                values = []
                for r in rounds:
                    b = r.get(base, {}).get(n)
                    v = r.get(mode, {}).get(n)
                    if b and v and cpu_total(v) > 0:
                        values.append(cpu_total(b) / cpu_total(v))
                return statistics.median(values) if values else float("nan")

            cpu: dict[str, float] = {}
            for name in samples[0]["cpu_us_per_request"]:
                vals = [s["cpu_us_per_request"].get(name) for s in samples]
                vals = [v for v in vals if v is not None]
                if vals:
                    cpu[name] = statistics.median(vals)
            out[mode][str(n)] = {
                "clients": n,
                "rps": med("rps"),
                "p50_ms": med("p50_ms"),
                "p99_ms": med("p99_ms"),
                "errors": sum(s["errors"] for s in samples),
                "completed": sum(s["completed"] for s in samples),
                "ratio_to_plain": ratio("plain"),
                "ratio_to_aiocoap_plain": ratio("aio_plain"),
                "cpu_us_per_request": cpu,
                "cpu_total_us_per_request": statistics.median(cpu_total(x) for x in samples),
                "cpu_ratio_to_plain": cpu_ratio("plain"),
                "cpu_ratio_to_aiocoap_plain": cpu_ratio("aio_plain"),
                "rounds": [s["rps"] for s in samples],
            }
    return out


# -------------------------------------------------------------------------------- targets


def _target(name: str, measured: float, limit: float, *, at_least: bool, unit: str,
            note: str = "", also: str = "") -> dict[str, Any]:
    ok = (measured >= limit) if at_least else (measured <= limit)
    if math.isnan(measured):
        ok = False
    return {
        "target": name,
        "limit": limit,
        "comparison": ">=" if at_least else "<=",
        "measured": measured,
        "unit": unit,
        "result": "PASS" if ok else "FAIL",
        "note": note,
        "also": also,
    }


HANDSHAKE_LABELS = {
    "psk": "psk",
    "certificate": "certificate (X.509)",
    "rpk": "certificate (raw public keys, RFC 7250)",
    "resumed": "resumed (X.509)",
}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    thr = results.get("throughput", {}).get("summary", {})
    for n in ("1", "50"):
        for mode, limit in (("l0psk_l1", 0.7), ("l0cert_l1", 0.7), ("l0rpk_l1", 0.7),
                            ("oscore_l1", 0.8)):
            if mode in thr and n in thr[mode]:
                t.append(_target(
                    f"{MODES[mode].label} throughput / plain CoAP, {n} client(s)",
                    thr[mode][n]["ratio_to_plain"], limit, at_least=True, unit="x",
                    note="median of same-round ratios",
                    also=f"CPU-based {thr[mode][n]['cpu_ratio_to_plain']:.2f}"))
        if "plain" in thr and n in thr["plain"]:
            t.append(_target(
                f"plain CoAP via coap-proxy / aiocoap-proxy baseline, {n} client(s)",
                thr["plain"][n]["ratio_to_aiocoap_plain"], 1.0, at_least=True, unit="x",
                note="whole chains: client, proxy and server differ",
                also=f"CPU-based {thr['plain'][n]['cpu_ratio_to_aiocoap_plain']:.2f}"))
            if "aio_via_coap_proxy" in thr and n in thr["aio_via_coap_proxy"]:
                t.append(_target(
                    f"coap-proxy alone (aiocoap client and server) / aiocoap-proxy, {n} client(s)",
                    thr["aio_via_coap_proxy"][n]["ratio_to_aiocoap_plain"], 1.0,
                    at_least=True, unit="x", note="same client and server, only the proxy differs",
                    also="CPU-based "
                    f"{thr['aio_via_coap_proxy'][n]['cpu_ratio_to_aiocoap_plain']:.2f}"))
    wire = results.get("wire", {}).get("overhead", {})
    for mode, limit in (("l0psk", 40), ("l0cert", 40), ("l0rpk", 40), ("oscore", 14)):
        if mode in wire:
            for direction in ("request", "response"):
                t.append(_target(
                    f"end-to-end overhead per {direction}, {mode} over plain CoAP (hop 1)",
                    wire[mode][f"hop1_{direction}"], limit, at_least=False, unit="bytes",
                    note="plain hops; the same with Layer 1 on both hops: "
                         f"{wire.get(mode + '_l1', {}).get(f'hop1_{direction}', float('nan')):.0f}"
                         " (vs Layer 1 only)"))
    hs = results.get("handshake", {}).get("profiles", {})
    for kind, limit in (("certificate", 1300), ("rpk", 1300), ("resumed", 350), ("psk", 450)):
        if kind in hs:
            t.append(_target(f"Layer 0 handshake bytes, {HANDSHAKE_LABELS[kind]}",
                             hs[kind]["total_bytes"], limit, at_least=False, unit="bytes",
                             note="DTLS records, cookie exchange included"
                             if hs[kind].get("cookie_exchange") else
                             "DTLS records, no cookie exchange"))
    for kind in ("psk", "certificate", "rpk", "resumed"):
        if kind in hs:
            t.append(_target(f"Layer 0 round trips beyond the cookie exchange, {kind}",
                             hs[kind]["round_trips_beyond_cookie"], 2, at_least=False,
                             unit="round trips",
                             note=f"{hs[kind]['round_trips']} outer exchanges in all"))
    rate = results.get("handshake", {})
    if "rate_in_process" in rate:
        t.append(_target("full certificate handshakes/s, server engine + Layer 0 (in-process)",
                         rate["rate_in_process"]["per_second"], 300, at_least=True, unit="/s",
                         note="Layer0ServerCore time only, one core"))
    if "rate_in_process_rpk" in rate:
        t.append(_target("full raw-public-key handshakes/s, server engine + Layer 0 (in-process)",
                         rate["rate_in_process_rpk"]["per_second"], 300, at_least=True,
                         unit="/s", note="Layer0ServerCore time only, one core"))
    for key, what in (("rate_sustained", "certificate"), ("rate_sustained_rpk", "raw-public-key")):
        busy = rate.get(key)
        if busy and busy.get("server_cpu_bound_per_second"):
            t.append(_target(
                f"full {what} handshakes/s sustained by coap-server (over the wire)",
                busy["server_cpu_bound_per_second"], 300, at_least=True,
                unit="/s per core",
                note=f"server busy {100 * busy['server_cpu_share']:.0f}% of a core,"
                     f" {busy['server_cpu_ms_per_handshake']:.2f} ms CPU each;"
                     f" wall {busy['wall_per_second']:.0f}/s"))
    t.extend(_shield_targets(results.get("shield", {})))
    mem = results.get("memory", {})
    for _key, entry in sorted(mem.items()):
        if not isinstance(entry, dict) or "bytes_per_item" not in entry:
            continue
        kind, count = entry["kind"], entry["count"]
        if kind == "cert-release-buffers":
            continue  # an experiment, listed with the cheap wins
        limit = 2 if kind == "oscore" else 40
        what = "OSCORE context" if kind == "oscore" else f"Layer 0 session ({kind})"
        t.append(_target(f"memory per {what} at {count:,}", entry["bytes_per_item"] / KIB,
                         limit, at_least=False, unit="KiB", note=entry.get("where", "")))
    t += _startup_targets(results.get("startup", {}))
    t += _rtt_targets(results.get("rtt", {}))
    return t


#: Issue 23's limits on round trips to the first protected answer (cold, warm). PSK: 3, as
#: the issue allows for a suite without forward secrecy (no False Start, RFC 7918 section 3).
RTT_LIMITS = {"l0psk": (3, 3), "l0cert": (2, 2), "l0rpk": (2, 2), "oscore": (3, 1),
              "oscore_psk": (3, 1), "oscore_rpk": (3, 1)}


def _rtt_targets(rtt: dict[str, Any]) -> list[dict[str, Any]]:
    t = []
    ref = rtt.get("reference", {})
    for mode, (cold, warm) in RTT_LIMITS.items():
        entry = rtt.get("modes", {}).get(mode)
        if entry is None:
            continue
        for run, limit in (("cold", cold), ("warm", warm)):
            t.append(_target(
                f"round trips to the first protected answer, {mode}, {run}",
                entry[run]["round_trips"], limit, at_least=False, unit="round trips",
                note=f"{ref.get('label', 'reference')}: {ref.get(run)}"))
    return t


def _startup_targets(startup: dict[str, Any]) -> list[dict[str, Any]]:
    from .startup import GET_TARGET, HELP_TARGET

    t = []
    for key, label, limit in (("help", "coap-client --help", HELP_TARGET),
                              ("get", "coap-client first plain GET on loopback", GET_TARGET)):
        figures = startup.get(key, {})
        ours = figures.get("coap-client")
        if ours is None:
            continue
        others = ", ".join(f"{name} {1000 * x:.0f}" for name, x in figures.items()
                           if name in ("aiocoap-client", "coap-client-notls") and x is not None)
        t.append(_target(f"start-up: {label}", 1000 * ours, 1000 * limit, at_least=False,
                         unit="ms", also=others))
    return t


def _shield_targets(shield: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19: what coap-proxy spares the device, and its cache hits against aiocoap-proxy."""
    t: list[dict[str, Any]] = []
    ours = shield.get("coap-proxy", {})
    reads, obs = ours.get("reads", {}), ours.get("observe", {})
    theirs = shield.get("aiocoap-proxy", {})
    if "upstream_per_downstream" in reads:
        ratio = reads["upstream_per_downstream"]
        t.append(_target(
            "coap-proxy upstream GETs per downstream GET, 50 clients reading one resource",
            float("nan") if ratio is None else ratio, 0.1, at_least=False, unit="x",
            note="device's own count", also=f"{reads['upstream']} of {reads['downstream']}"))
    if "upstream_registrations" in obs:
        t.append(_target(
            f"coap-proxy upstream observations for {obs['observers']} observers of one resource",
            obs["upstream_registrations"], 1, at_least=False, unit="",
            note="device's own count",
            also=f"{obs['observers_notified']} of {obs['observers']} notified"))
    if "cache_hit_rps_ratio" in shield:
        t.append(_target(
            "coap-proxy answering from its cache / aiocoap-proxy forwarding, req/s, 50 clients",
            shield["cache_hit_rps_ratio"], 1.0, at_least=True, unit="x",
            note="aiocoap-proxy does not cache",
            also=f"{_fmt(reads.get('rps'))} vs {_fmt(theirs.get('reads', {}).get('rps'))}"))
    return t


# ---------------------------------------------------------------------------------- table


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(
            (c.rjust(w) if i else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths,
                                                                              strict=True))))
    return "\n".join(out)


def render_startup_only(results: dict[str, Any]) -> str:
    from .startup import render as render_startup

    rows = [[x["target"], f"{x['comparison']} {_fmt(x['limit'])} {x['unit']}",
             _fmt(x["measured"]), x["result"], x.get("also", "")]
            for x in results.get("targets", [])]
    return render_startup(results["startup"]) + "\n\n" + _table(
        ["target", "limit", "measured", "result", "also (ms)"], rows)


def render(results: dict[str, Any]) -> str:
    parts: list[str] = []
    meta = results.get("meta", {})
    parts.append(f"coap-bench {'--quick ' if meta.get('quick') else ''}on {meta.get('host')}"
                 f" ({meta.get('cpus')} CPUs, load average before {meta.get('loadavg')}),"
                 f" {meta.get('rounds')} round(s) x {meta.get('duration')} s per point,"
                 f" 40-byte POST /echo")
    summary = results.get("throughput", {}).get("summary", {})
    if summary:
        rows = []
        errors = 0
        for mode, per_n in summary.items():
            for n, s in per_n.items():
                cpu = s["cpu_us_per_request"]
                proxy = cpu.get("coap-proxy") if mode in (
                    "plain", "l1", "l0psk_l1", "l0cert_l1", "l0rpk_l1", "oscore_l1",
                    "aio_via_coap_proxy") else cpu.get("aiocoap-proxy")
                server = cpu.get("aiocoap-server") if mode.startswith("aio") \
                    else cpu.get("coap-server")
                rows.append([MODES[mode].label if n == "1" else "", n, _fmt(s["rps"]),
                             _fmt(s["ratio_to_plain"], 2), _fmt(s["ratio_to_aiocoap_plain"], 2),
                             _fmt(s["p50_ms"], 1), _fmt(s["p99_ms"], 1), _fmt(proxy),
                             _fmt(server), _fmt(cpu.get("client (coap-bench)")),
                             _fmt(s["cpu_ratio_to_plain"], 2),
                             _fmt(s["cpu_ratio_to_aiocoap_plain"], 2)])
                errors += s["errors"]
        parts.append("\nThroughput and latency through the proxy (median of rounds; ratios are"
                     " medians of same-round ratios; CPU = microseconds of CPU per request;"
                     " 'CPU x' = the baseline's total CPU per request / this mode's)")
        parts.append(_table(["mode", "clients", "req/s", "x plain", "x aiocoap", "p50 ms",
                             "p99 ms", "proxy CPU", "server CPU", "client CPU",
                             "CPU x plain", "CPU x aiocoap"], rows))
        parts.append(f"failed requests: {errors}")
    wire = results.get("wire", {})
    if wire.get("modes"):
        rows = []
        ov = wire.get("overhead", {})
        for mode, w in wire["modes"].items():
            o = ov.get(mode, {})
            rows.append([w["label"], _fmt(w["hop1"]["up_bytes_per_request"]),
                         _fmt(w["hop1"]["down_bytes_per_request"]),
                         _fmt(w["hop2"]["up_bytes_per_request"]),
                         _fmt(w["hop2"]["down_bytes_per_request"]),
                         _fmt(o.get("hop1_request")), _fmt(o.get("hop1_response")),
                         o.get("versus", "")])
        parts.append("\nBytes on the wire per request (UDP payload; add 28 per datagram for"
                     " IPv4+UDP); one datagram each way per request in every mode")
        parts.append(_table(["mode", "hop1 req", "hop1 resp", "hop2 req", "hop2 resp",
                             "+req", "+resp", "overhead versus"], rows))
        if wire.get("stock_aiocoap_oscore_via_aiocoap_proxy"):
            parts.append("stock aiocoap OSCORE client through aiocoap-proxy: "
                         + wire["stock_aiocoap_oscore_via_aiocoap_proxy"]
                         + "; the aiocoap-OSCORE baseline therefore uses coaplayers'"
                           " SecurityContext on the client (aiocoap's RFC 8613 code, Proxy-Scheme"
                           " and Uri-Port kept outer) against a stock aiocoap server")
    hs = results.get("handshake", {})
    if hs.get("profiles"):
        rows = []
        for kind in ("psk", "certificate", "rpk", "resumed"):
            if kind not in hs["profiles"]:
                continue
            p = hs["profiles"][kind]
            flights = " ".join(f"{'C' if f['from'] == 'client' else 'S'}{f['bytes']}"
                               for f in p["flights"])
            rows.append([HANDSHAKE_LABELS[kind], flights, _fmt(p["total_bytes"]),
                         _fmt(p["round_trips"]), _fmt(p["round_trips_beyond_cookie"])])
        parts.append("\nLayer 0 handshake (DTLS bytes per flight, C = client, S = server; round"
                     " trips = outer CoAP exchanges)")
        parts.append(_table(["handshake", "flights", "total", "round trips", "beyond cookie"],
                            rows))
        wire_modes = wire.get("modes", {})
        extra = []
        for mode in ("l0psk", "l0cert", "l0rpk", "oscore", "l0psk_l1", "l0cert_l1", "l0rpk_l1",
                     "oscore_l1"):
            h = wire_modes.get(mode, {}).get("e2e_handshake")
            if h:
                extra.append(f"{mode}: hop 1 {h['hop1']['total_bytes']} B in"
                             f" {h['hop1']['up_datagrams']}+{h['hop1']['down_datagrams']}"
                             " datagrams")
        if extra:
            parts.append("on the wire, CoAP (and Layer 1) included, OSCORE = keying: "
                         + "; ".join(extra))
    if hs.get("rate_in_process"):
        line = ""
        for what, inproc, wire_key in (("certificate", "rate_in_process", "rate_over_wire"),
                                       ("raw-public-key", "rate_in_process_rpk",
                                        "rate_over_wire_rpk")):
            r = hs.get(inproc)
            if not r:
                continue
            line += (f"\nFull {what} handshakes/s at the server: {r['per_second']:.0f}/s"
                     f" in-process ({r['server_ms_per_handshake']:.2f} ms server time each)")
            w = hs.get(wire_key)
            if w and w.get("server_cpu_bound_per_second"):
                line += (f"; over the wire from coap-client's engine (Layer0Client) coap-server"
                         f" used {w['server_cpu_ms_per_handshake']:.2f} ms CPU per handshake ="
                         f" {w['server_cpu_bound_per_second']:.0f}/s per core"
                         f" (wall {w['wall_per_second']:.0f}/s, server mostly idle: the client"
                         " is the limit)")
            b = hs.get(wire_key.replace("over_wire", "sustained"))
            if b and b.get("server_cpu_bound_per_second"):
                line += (f"; from the lean generator, server busy"
                         f" {100 * b['server_cpu_share']:.0f}% of a core:"
                         f" {b['wall_per_second']:.0f}/s wall,"
                         f" {b['server_cpu_ms_per_handshake']:.2f} ms CPU each ="
                         f" {b['server_cpu_bound_per_second']:.0f}/s per core")
        parts.append(line)
    shield = results.get("shield", {})
    if shield:
        rows = []
        for name in ("coap-proxy", "aiocoap-proxy"):
            e = shield.get(name, {})
            r, o = e.get("reads", {}), e.get("observe", {})
            rows.append([name, _fmt(r.get("rps")), _fmt(r.get("downstream")),
                         _fmt(r.get("upstream")), _fmt(r.get("upstream_per_downstream"), 3),
                         _fmt(o.get("upstream_registrations")),
                         _fmt(o.get("observers_notified")),
                         (r.get("error") or o.get("error") or "")[:60]])
        parts.append("\nShielding the device: 50 clients reading, then observing, one resource"
                     " through each proxy (upstream = what reached the server)")
        parts.append(_table(["proxy", "reads/s", "downstream", "upstream", "up/down",
                             "upstream observations", "observers notified", "error"], rows))
    rtt = results.get("rtt", {})
    if rtt.get("modes"):
        ref = rtt["reference"]
        rows = [[ref["label"] + " (reference)", str(ref["cold"]), "", str(ref["warm"]), ""]]
        for entry in rtt["modes"].values():
            rows.append([entry["label"], str(entry["cold"]["round_trips"]),
                         _fmt(1000 * entry["cold"]["processing_s"]),
                         str(entry["warm"]["round_trips"]),
                         _fmt(1000 * entry["warm"]["processing_s"])])
        parts.append(f"\nRound trips to the first protected answer (one client run, hop 1"
                     f" delayed {rtt['delay_ms']} ms each way; processing = time left over)")
        parts.append(_table(["mode", "cold", "processing ms", "warm", "processing ms"], rows))
    loss = results.get("loss", {})
    if loss.get("modes"):
        rows = []
        for entry in loss["modes"].values():
            for run in ("cold", "warm"):
                e = entry[run]
                rows.append([entry["label"] if run == "cold" else "", run,
                             f"{e['answered']}/{e['runs']}", _fmt(e["median_s"], 2),
                             _fmt(e["max_s"], 2)])
        parts.append(f"\nOne-shot latency at {100 * loss['loss']:.0f}% loss each way on hop 1"
                     " (fresh client through coap-proxy; warm: with what it kept)")
        parts.append(_table(["mode", "run", "answered", "median s", "max s"], rows))
    mem = results.get("memory", {})
    rows = []
    for key, e in mem.items():
        if isinstance(e, dict) and "bytes_per_item" in e:
            rows.append([key, _fmt(e["count"]), _fmt(e["bytes_per_item"] / KIB, 1),
                         _fmt((e["rss_after"] - e["rss_before"]) / 2**20, 1),
                         _fmt(e["seconds"], 1)])
    if rows:
        parts.append("\nMemory (server RSS growth / count; in-process, see method in JSON)")
        parts.append(_table(["what", "count", "KiB each", "MiB growth", "seconds"], rows))
    if results.get("startup"):
        from .startup import render as render_startup

        parts.append("\n" + render_startup(results["startup"]))
    targets = results.get("targets", [])
    if targets:
        rows = [[x["target"], f"{x['comparison']} {_fmt(x['limit'], 1 if x['limit'] < 10 else 0)}"
                 f" {x['unit']}", _fmt(x["measured"], 2 if abs(x["measured"]) < 10 else 0),
                 x["result"], x.get("also", "")] for x in targets]
        parts.append("\nTargets (issues 7 and 23)")
        parts.append(_table(["target", "limit", "measured", "result", "also"], rows))
        fails = sum(1 for x in targets if x["result"] == "FAIL")
        parts.append(f"{len(targets) - fails} PASS, {fails} FAIL")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ PNG


def write_png(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    summary = results.get("throughput", {}).get("summary", {})
    modes = list(summary)
    labels = [m.replace("_", "\n") for m in modes]
    x = range(len(modes))
    ax = axes[0][0]
    for i, n in enumerate(("1", "50")):
        ax.bar([v + (i - 0.5) * 0.4 for v in x],
               [summary[m].get(n, {}).get("rps", 0) for m in modes], 0.4,
               label=f"{n} client{'s' if n != '1' else ''}")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput through the proxy (40-byte POST)")
    ax.legend()
    ax = axes[0][1]
    for i, (n, key) in enumerate((("1", "p50_ms"), ("1", "p99_ms"), ("50", "p50_ms"),
                                  ("50", "p99_ms"))):
        ax.bar([v + (i - 1.5) * 0.2 for v in x],
               [summary[m].get(n, {}).get(key, 0) for m in modes], 0.2,
               label=f"{key[:3]}, {n} client(s)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (log)")
    ax.set_title("Latency")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    wmodes = results.get("wire", {}).get("modes", {})
    names = list(wmodes)
    xs = range(len(names))
    for i, (hop, d) in enumerate((("hop1", "up"), ("hop1", "down"), ("hop2", "up"),
                                  ("hop2", "down"))):
        ax.bar([v + (i - 1.5) * 0.2 for v in xs],
               [wmodes[m][hop][f"{d}_bytes_per_request"] for m in names], 0.2,
               label=f"{hop} {'request' if d == 'up' else 'response'}")
    ax.set_xticks(list(xs), [m.replace("_", "\n") for m in names], fontsize=8)
    ax.set_ylabel("bytes per message (UDP payload)")
    ax.set_title("Bytes on the wire")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    profiles = results.get("handshake", {}).get("profiles", {})
    kinds = [k for k in ("psk", "certificate", "rpk", "resumed") if k in profiles]
    for j, kind in enumerate(kinds):
        bottom = 0
        for f in profiles[kind]["flights"]:
            color = "tab:blue" if f["from"] == "client" else "tab:orange"
            ax.bar(j, f["bytes"], 0.6, bottom=bottom, color=color, edgecolor="white")
            bottom += f["bytes"]
    for limit, kind in ((450, "psk"), (1300, "certificate"), (1300, "rpk"), (350, "resumed")):
        if kind in kinds:
            j = kinds.index(kind)
            ax.hlines(limit, j - 0.4, j + 0.4, colors="red", linestyles="dashed")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("DTLS bytes (blue client, orange server flights; red: target)")
    ax.set_title("Layer 0 handshake")
    fig.suptitle("coap-bench" + (" --quick" if results.get("meta", {}).get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
