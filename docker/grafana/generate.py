#!/usr/bin/env python3
"""Writes dashboards/tether.json, the tether Grafana dashboard, from the panel list below.

The JSON is the artifact Grafana loads and tests read (tests/tests/promql.rs runs every
expression in it against a real Prometheus); this script only keeps the layout regular. Run it
after editing the panels: `python3 docker/grafana/generate.py`.
"""
import json
import os

SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"

# (row, [(title, unit, kind, [(expr, legend)], description)])
ROWS = [
    ("Fleet overview", [
        ("Agents connected per server replica", "short", "timeseries",
         [(f'tether_agents_connected{{{SEL}}}', "{{instance}}")],
         "Agent sessions each server holds (tether_agents_connected)."),
        ("Sessions per client", "short", "timeseries",
         [(f'sum by (client) (tether_sessions{{{SEL}}})', "{{client}}")],
         "Live sessions per agent id across the selected servers; 0 for a known agent that is not connected."),
        ("Session events", "ops", "timeseries",
         [(f'instance:tether_session_events:rate5m{{{SEL}}}', "{{instance}} {{event}}")],
         "Sessions added, removed and replaced (stale_removed) per second."),
        ("Agents: connected to the server", "short", "stat",
         [(f'tether_agent_connected{{{SEL}}}', "{{instance}}")],
         "Each agent's own view: 1 when it has a session."),
        ("Agents: activation gate", "short", "timeseries",
         [(f'tether_agent_gate{{{SEL}}} == 1', "{{instance}} {{state}}")],
         "The state each agent's activation gate is in (enabled or disabled)."),
        ("Versions", "short", "stat",
         [(f'count by (job, version) (tether_build_info{{{SEL}}})', "{{job}} {{version}}")],
         "Daemons running each version."),
    ]),
    ("Traffic", [
        ("Streams opened", "ops", "timeseries",
         [(f'instance:tether_streams_opened:rate5m{{{SEL}}}', "{{job}} {{instance}}")],
         "Streams opened per second (tunnelled connections)."),
        ("Streams closed by reason", "ops", "timeseries",
         [(f'instance:tether_streams_closed:rate5m{{{SEL}}}', "{{job}} {{instance}} {{reason}}")],
         "Streams closed per second: fin (both directions finished), reset, and the failure reasons."),
        ("Streams active", "short", "timeseries",
         [(f'tether_streams_active{{{SEL}}}', "{{job}} {{instance}}")],
         "Streams open now."),
        ("Bytes per second", "Bps", "timeseries",
         [(f'instance:tether_stream_bytes:rate5m{{{SEL}}}', "{{job}} {{instance}} {{direction}}")],
         "Payload bytes per second; rx from the daemon's peer, tx to it."),
        ("Dial latency p50 / p99", "s", "timeseries",
         [(f'instance:tether_dial_duration_seconds:p50_5m{{{SEL}}}', "p50 {{instance}}"),
          (f'instance:tether_dial_duration_seconds:p99_5m{{{SEL}}}', "p99 {{instance}}")],
         "Time from OPEN to the agent's answer, as the server measures it."),
        ("Dial latency histogram", "s", "heatmap",
         [(f'sum by (le) (rate(tether_dial_duration_seconds_bucket{{{SEL}}}[{RATE}]))', "{{le}}")],
         "Distribution of dial durations."),
        ("Dial errors by code", "ops", "timeseries",
         [(f'instance:tether_dial_errors:rate5m{{{SEL}}}', "{{instance}} {{code}}")],
         "Failed dials per second by code (no_session, refused, timeout, denied, ...); empty until a dial fails."),
        ("Agent dials by outcome", "ops", "timeseries",
         [(f'sum by (instance, outcome) (rate(tether_agent_dials_total{{{SEL}}}[{RATE}]))', "{{instance}} {{outcome}}")],
         "Target connections the agents made, by outcome."),
        ("Frontend refusals", "ops", "timeseries",
         [(f'instance:tether_frontend_refusals:rate5m{{{SEL}}} > 0', "{{frontend}} {{reason}}")],
         "Consumers refused per second by the HTTP CONNECT and SOCKS5 proxies, by reason; empty while nothing is refused."),
        ("Frontend connections", "short", "timeseries",
         [(f'tether_frontend_connections_active{{{SEL}}}', "{{instance}} {{frontend}}")],
         "Consumer connections each proxy holds."),
    ]),
    ("Health", [
        ("RTT per client", "s", "timeseries",
         [(f'tether_session_rtt_seconds{{{SEL}}}', "{{client}}")],
         "Last health-probe round trip of each client's newest session."),
        ("Unhealthy sessions", "short", "timeseries",
         [(f'tether_health_unhealthy_sessions{{{SEL}}}', "{{instance}}")],
         "Sessions that missed health.unhealthy_after probes in a row."),
        ("Health probes", "ops", "timeseries",
         [(f'sum by (instance, result) (rate(tether_health_probes_total{{{SEL}}}[{RATE}]))', "{{instance}} {{result}}")],
         "Health probes per second by result (ok, timeout, closed)."),
        ("Agent reconnects", "short", "timeseries",
         [(f'increase(tether_agent_reconnects_total{{{SEL}}}[1h])', "{{instance}}")],
         "Reconnects of each agent over the last hour."),
        ("Agent connect failures", "ops", "timeseries",
         [(f'sum by (instance, reason) (rate(tether_agent_connect_failures_total{{{SEL}}}[{RATE}]))', "{{instance}} {{reason}}")],
         "Failed attempts to reach the server, by kind."),
        ("Config reloads", "short", "timeseries",
         [(f'sum by (job, instance, result) (increase(tether_config_reloads_total{{{SEL}}}[1h]))', "{{job}} {{instance}} {{result}}")],
         "Reloads over the last hour by result (applied, unchanged, invalid)."),
        ("Certificate expiry", "d", "timeseries",
         [(f'instance:tether_tls_cert_expiry:seconds_left{{{SEL}}} / 86400', "{{instance}} {{cert}}")],
         "Days until each loaded certificate expires."),
        ("Handshake and auth failures", "ops", "timeseries",
         [(f'sum by (instance, reason) (rate(tether_tls_handshake_failures_total{{{SEL}}}[{RATE}]))', "tls {{instance}} {{reason}}"),
          (f'sum by (instance, reason) (rate(tether_auth_failures_total{{{SEL}}}[{RATE}]))', "auth {{instance}} {{reason}}")],
         "Agent connections refused during TLS or the upgrade; empty until one is."),
        ("Audit log", "ops", "timeseries",
         [(f'instance:tether_audit_lines:rate5m{{{SEL}}}', "{{instance}} {{result}}"),
          (f'tether_audit_queue_lines{{{SEL}}}', "{{instance}} queued")],
         "Audit lines per second by result (written, dropped, write_failed) and lines waiting for the writer."),
    ]),
    ("Resources", [
        ("Heap", "bytes", "timeseries",
         [(f'tether_heap_allocated_bytes{{{SEL}}}', "allocated {{job}} {{instance}}"),
          (f'tether_heap_resident_bytes{{{SEL}}}', "resident {{job}} {{instance}}")],
         "jemalloc's heap: bytes allocated and pages resident."),
        ("Resident memory", "bytes", "timeseries",
         [(f'process_resident_memory_bytes{{{SEL}}}', "{{job}} {{instance}}")],
         "The process's RSS."),
        ("CPU", "percentunit", "timeseries",
         [(f'instance:process_cpu_seconds:rate5m{{{SEL}}}', "{{job}} {{instance}}")],
         "CPU seconds per second (1 = one core)."),
        ("Alive tasks", "short", "timeseries",
         [(f'tether_runtime_alive_tasks{{{SEL}}}', "{{job}} {{instance}}")],
         "tokio tasks alive."),
        ("Open file descriptors", "short", "timeseries",
         [(f'process_open_fds{{{SEL}}}', "open {{job}} {{instance}}"),
          (f'process_max_fds{{{SEL}}}', "max {{job}} {{instance}}")],
         "File descriptors open and the limit."),
        ("Pre-auth handshakes", "short", "timeseries",
         [(f'tether_preauth_handshakes_inflight{{{SEL}}}', "{{instance}}")],
         "Connections in TLS or the upgrade (bounded by max_pending_handshakes)."),
    ]),
]

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, unit, kind, targets, description, x, y):
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(ord("A") + i)}
            | ({"format": "heatmap"} if kind == "heatmap" else {})
            for i, (e, l) in enumerate(targets)
        ],
    }
    return p


def build():
    panels = []
    pid = 1
    y = 0
    for row, items in ROWS:
        panels.append({"id": pid, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, (title, unit, kind, targets, desc) in enumerate(items):
            panels.append(panel(pid, title, unit, kind, targets, desc, (i % 3) * 8, y + (i // 3) * 8))
            pid += 1
        y += ((len(items) + 2) // 3) * 8
    return {
        "uid": "tether",
        "title": "tether",
        "description": "tether servers and agents: fleet, traffic, health, resources. "
                       "Generated by docker/grafana/generate.py.",
        "tags": ["tether"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus", "current": {}, "hide": 0},
            {"name": "instance", "type": "query", "datasource": DS, "label": "instance",
             "query": {"query": 'label_values(up{job=~"tether-server|tether-agent"}, instance)',
                       "refId": "instance"},
             "definition": 'label_values(up{job=~"tether-server|tether-agent"}, instance)',
             "multi": True, "includeAll": True, "allValue": ".+", "refresh": 2,
             "current": {}, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "dashboards", "tether.json"), "w") as out:
        json.dump(build(), out, indent=2)
        out.write("\n")
