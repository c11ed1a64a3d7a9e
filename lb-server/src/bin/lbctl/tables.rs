//! The admin API's JSON answers as aligned text tables, one function per
//! command. Missing fields print as `-`: a table from an older or newer
//! server still prints.

use serde_json::Value;

/// Columns padded to their widest cell; the last column runs free.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// A JSON value as a cell: strings bare, numbers as written, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// A fraction as a percentage.
fn percent(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `lbctl services`.
pub fn services(v: &Value) -> String {
    let rows = items(v, "services")
        .iter()
        .map(|s| {
            vec![
                cell(&s["name"]),
                cell(&s["backends"]),
                cell(&s["healthy"]),
                cell(&s["listed"]),
                cell(&s["list_version"]),
                cell(&s["clients"]),
                if s["panic"].as_bool() == Some(true) {
                    "PANIC"
                } else {
                    ""
                }
                .to_string()
                    + &s["conflict"]
                        .as_str()
                        .map(|c| format!(" conflict: {c}"))
                        .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE", "BACKENDS", "HEALTHY", "LISTED", "VERSION", "CLIENTS", "NOTES",
        ],
        rows,
    )
}

/// `lbctl service NAME`: a summary line, the backends, calls and zones.
pub fn service(v: &Value) -> String {
    let mut out = format!(
        "service {}: {} backends, {} healthy, {} listed, list version {}, {} clients{}{}\n\n",
        cell(&v["name"]),
        items(v, "backends").len(),
        cell(&v["healthy"]),
        cell(&v["listed"]),
        cell(&v["list_version"]),
        cell(&v["clients"]),
        if v["panic"].as_bool() == Some(true) {
            ", PANIC (every backend listed)"
        } else {
            ""
        },
        v["conflict"]
            .as_str()
            .map(|c| format!(", conflict: {c}"))
            .unwrap_or_default(),
    );
    let rows = items(v, "backends")
        .iter()
        .map(|b| {
            let mut health = cell(&b["health"]);
            if b["drained"].as_bool() == Some(true) {
                health.push_str(" (drained)");
            }
            // What clients' outcomes say (gray failures), when not "admitted".
            if let Some(state) = b["gray"]["state"].as_str().filter(|s| *s != "admitted") {
                health.push_str(&format!(" ({state})"));
            }
            let flaps = b["health_transitions_10m"].as_u64().unwrap_or(0);
            let weight = match &b["weight_override"] {
                Value::Object(o) => format!("{} (override)", cell(&o["weight"].clone())),
                _ => format!("{:.2}", b["decision"]["weight"].as_f64().unwrap_or(0.0)),
            };
            vec![
                cell(&b["address"]),
                cell(&b["locality"]["zone"]),
                health,
                flaps.to_string(),
                weight,
                percent(&b["list_share"]),
                cell(&b["checked_by"]),
                cell(&b["decision"]["reason"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "BACKEND",
            "ZONE",
            "HEALTH",
            "FLAPS/10m",
            "WEIGHT",
            "SHARE",
            "CHECKED BY",
            "WHY",
        ],
        rows,
    ));
    let calls = &v["calls"];
    if calls.is_object() {
        out.push_str(&format!(
            "\ncalls reported by clients: {} started, {} finished, {} failed to send, {} dropped\n",
            cell(&calls["started"]),
            cell(&calls["finished"]),
            cell(&calls["failed_to_send"]),
            cell(&calls["dropped"]),
        ));
    }
    if v["zones"].is_object() {
        out.push_str(&format!(
            "\nzones (cross-zone {}):\n",
            percent(&v["zones"]["cross_zone_fraction"])
        ));
        let rows = items(&v["zones"], "zones")
            .iter()
            .map(|z| {
                let spill = z["spill"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(to, f)| {
                                format!("{}→{}", if to.is_empty() { "?" } else { to }, percent(f))
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                vec![
                    cell(&z["zone"]),
                    cell(&z["clients"]),
                    percent(&z["demand_share"]),
                    cell(&z["backends"]),
                    percent(&z["capacity_share"]),
                    percent(&z["local_share"]),
                    spill,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ZONE",
                "CLIENTS",
                "DEMAND",
                "BACKENDS",
                "CAPACITY",
                "LOCAL",
                "CALLS GO TO",
            ],
            rows,
        ));
    }
    out
}

/// `lbctl clients`: grpclb streams, then xDS streams.
pub fn clients(v: &Value) -> String {
    let rows = items(v, "clients")
        .iter()
        .map(|c| {
            vec![
                cell(&c["id"]),
                cell(&c["peer"]),
                cell(&c["name"]),
                cell(&c["service"]),
                cell(&c["zone"]),
                cell(&c["lists_sent"]),
                cell(&c["list_version"]),
                cell(&c["since"]),
            ]
        })
        .collect();
    let mut out = format!("grpclb streams: {}\n", items(v, "clients").len());
    out.push_str(&table(
        &[
            "ID",
            "PEER",
            "ASKED FOR",
            "SERVICE",
            "ZONE",
            "LISTS",
            "VERSION",
            "SINCE",
        ],
        rows,
    ));
    let rows = items(v, "xds_clients")
        .iter()
        .map(|c| {
            let types = c["types"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            vec![
                cell(&c["id"]),
                cell(&c["peer"]),
                cell(&c["node"]["id"]),
                cell(&c["node"]["zone"]),
                cell(&c["node"]["user_agent"]),
                types,
                cell(&c["responses_sent"]),
                cell(&c["since"]),
            ]
        })
        .collect();
    out.push_str(&format!(
        "\nxDS streams: {}\n",
        items(v, "xds_clients").len()
    ));
    out.push_str(&table(
        &[
            "ID",
            "PEER",
            "NODE",
            "ZONE",
            "CLIENT",
            "TYPES",
            "RESPONSES",
            "SINCE",
        ],
        rows,
    ));
    out
}

/// `lbctl cluster`.
pub fn cluster(v: &Value) -> String {
    if v["clustered"].as_bool() != Some(true) {
        return "not clustered: this replica checks every backend itself\n".into();
    }
    let view = &v["view"];
    let me = view["replica_id"].as_str().unwrap_or_default();
    let mut out = format!(
        "replica {me}, etcd session {}\n",
        if view["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED (checking every backend itself)"
        }
    );
    let rows = items(view, "replicas")
        .iter()
        .map(|r| {
            vec![
                cell(&r["id"])
                    + if r["id"].as_str() == Some(me) {
                        " (this one)"
                    } else {
                        ""
                    },
                cell(&r["lb_addr"]),
                cell(&r["admin_addr"]),
            ]
        })
        .collect();
    out.push_str(&table(&["REPLICA", "GRPC", "ADMIN"], rows));
    out
}

/// `lbctl drain | undrain | weight`: what was applied.
pub fn mutation(v: &Value) -> String {
    let mut out = format!(
        "{} {} {}",
        cell(&v["action"]),
        cell(&v["service"]),
        cell(&v["backend"])
    );
    if let Some(w) = v["weight"].as_u64() {
        out.push_str(&format!(" weight {w}"));
    }
    if let Some(t) = v["ttl_seconds"].as_u64() {
        out.push_str(&format!(
            " for {}",
            humantime::format_duration(std::time::Duration::from_secs(t))
        ));
    }
    out + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_tolerate_missing_fields() {
        let v = serde_json::json!({"services": [
            {"name": "greeter", "backends": 3, "healthy": 2, "listed": 2, "list_version": 7, "clients": 1, "panic": false},
            {"name": "a-much-longer-name", "backends": 1}
        ]});
        let text = services(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("BACKENDS").unwrap();
        assert_eq!(&lines[1][col..col + 1], "3");
        assert!(lines[2].contains(" -  "), "{text}");
    }
}
