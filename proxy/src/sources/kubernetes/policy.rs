//! Istio's `security.istio.io/v1` `AuthorizationPolicy` → the model, the
//! L4 subset: `selector.matchLabels`, `action` ALLOW/DENY, `rules[].from[]
//! .source.{principals, notPrincipals, namespaces, notNamespaces, ipBlocks,
//! notIpBlocks}` and `rules[].to[].operation.{ports, notPorts}`.
//!
//! Fields an L4 proxy cannot check (methods, paths, hosts, request
//! principals, `when` conditions) are handled the way Istio handles them in
//! its L4 proxy (ztunnel): a rule of an ALLOW policy that uses one matches
//! nothing; a DENY rule is enforced on its L4 part (it then denies more
//! than the full rule would — the safe side). Each such case is noted, and
//! the notes reach the log and `/config_dump`.
//!
//! Read from JSON directly rather than typed structs: an unknown or
//! future field must become a note, never a refused object.

use serde_json::Value;

use crate::model::{parse_ip_block, Action, AuthorizationPolicy, ObjectKey, Rule, Selector};

/// More rules than any hand-written policy has: a policy expanding to more
/// (from × to per rule) is refused rather than evaluated per connection.
const MAX_RULES: usize = 1024;
/// Principals, namespaces, blocks and ports over all the rules a policy
/// expands to: bounds its memory on every node (one policy object is
/// translated by every proxy of the cluster).
const MAX_ENTRIES: usize = 16_384;
/// Notes kept per policy; more are summarized.
const MAX_NOTES: usize = 8;
/// Istio's default root namespace: its policies apply mesh-wide there.
const ROOT_NAMESPACE: &str = "istio-system";

/// A translated policy: `None` when it has no effect on this proxy.
#[derive(Debug, Default)]
pub struct Translated {
    pub policy: Option<AuthorizationPolicy>,
    /// What was not applied as written, for the operator.
    pub notes: Vec<String>,
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("{field} must be a list of strings")))
            .collect(),
        Some(_) => Err(format!("{field} must be a list of strings")),
    }
}

fn ports(v: &Value, field: &str) -> Result<Vec<u16>, String> {
    let bad = |p: &Value| format!("{field}: {p} is not a port");
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|p| {
                let n = match p {
                    Value::String(s) => s.trim().parse::<u16>().ok(),
                    Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    _ => None,
                };
                n.filter(|n| *n != 0).ok_or_else(|| bad(p))
            })
            .collect(),
        Some(_) => Err(format!("{field} must be a list of ports")),
    }
}

/// Istio writes principals without the scheme: `cluster.local/ns/NS/sa/SA`.
fn principal(p: String) -> String {
    if p.starts_with('*') || p.starts_with("spiffe://") {
        p
    } else {
        format!("spiffe://{p}")
    }
}

/// The fields of `object` not in `known`, for notes.
fn unknown(object: &Value, known: &[&str]) -> Vec<String> {
    object.as_object().map(|o| o.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect()).unwrap_or_default()
}

/// One `from[].source`, as the L4 fields of a rule.
fn source(s: &Value, unsupported: &mut Vec<String>) -> Result<Rule, String> {
    const KNOWN: [&str; 6] = ["principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks"];
    unsupported.extend(unknown(s, &KNOWN).into_iter().map(|f| format!("source.{f}")));
    let blocks = |field| -> Result<Vec<ipnet::IpNet>, String> {
        strings(s, field)?.iter().map(|b| parse_ip_block(b).map_err(|e| format!("{field}: {e}"))).collect()
    };
    Ok(Rule {
        principals: strings(s, "principals")?.into_iter().map(principal).collect(),
        not_principals: strings(s, "notPrincipals")?.into_iter().map(principal).collect(),
        namespaces: strings(s, "namespaces")?,
        not_namespaces: strings(s, "notNamespaces")?,
        ip_blocks: blocks("ipBlocks")?,
        not_ip_blocks: blocks("notIpBlocks")?,
        ..Rule::default()
    })
}

/// One `to[].operation`: its ports.
fn operation(o: &Value, unsupported: &mut Vec<String>) -> Result<(Vec<u16>, Vec<u16>), String> {
    unsupported.extend(unknown(o, &["ports", "notPorts"]).into_iter().map(|f| format!("operation.{f}")));
    Ok((ports(o, "ports")?, ports(o, "notPorts")?))
}

/// The entries of `list` (`from` or `to`), each's `inner` object. A missing
/// list is one entry with no constraint.
fn entries<'a>(rule: &'a Value, list: &str, inner: &str) -> Result<Vec<&'a Value>, String> {
    static EMPTY: Value = Value::Null;
    match rule.get(list) {
        None | Some(Value::Null) => Ok(vec![&EMPTY]),
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().map(|i| i.get(inner).ok_or_else(|| format!("{list}[] has no {inner}"))).collect()
        }
        Some(Value::Array(_)) => Ok(vec![&EMPTY]),
        Some(_) => Err(format!("{list} must be a list")),
    }
}

/// `spec` of an AuthorizationPolicy → the model. `Err`: malformed (the
/// object is skipped and reported).
pub fn translate(key: ObjectKey, spec: &Value) -> Result<Translated, String> {
    let mut out = Translated::default();
    if spec.get("targetRef").is_some() || spec.get("targetRefs").is_some() {
        out.notes.push("targetRefs attach it to a gateway or waypoint, not to workloads: no effect here".into());
        return Ok(out);
    }
    let action = match spec.get("action").and_then(Value::as_str).unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => {
            out.notes.push("action AUDIT only logs, in Istio's HTTP proxies: no effect here".into());
            return Ok(out);
        }
        "CUSTOM" => {
            out.notes.push("action CUSTOM (external authorization) is not supported: the policy is ignored".into());
            return Ok(out);
        }
        other => return Err(format!("action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM")),
    };
    let selector = match spec.get("selector") {
        None | Some(Value::Null) => None,
        Some(sel) => {
            let labels = sel.get("matchLabels").cloned().unwrap_or(Value::Null);
            let match_labels = match labels {
                Value::Null => Default::default(),
                Value::Object(map) => map
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(v) => Ok((k, v)),
                        _ => Err(format!("selector.matchLabels.{k} must be a string")),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err("selector.matchLabels must be a map".into()),
            };
            Some(Selector { match_labels, ..Selector::default() })
        }
    };
    let rules_in = match spec.get("rules") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(items)) => &items[..],
        Some(_) => return Err("rules must be a list".into()),
    };
    if key.namespace.as_ref() == ROOT_NAMESPACE {
        out.notes.push(format!(
            "in Istio's root namespace ({ROOT_NAMESPACE}) a policy applies mesh-wide; here it applies to pods of {ROOT_NAMESPACE} only"
        ));
    }
    let mut rules = Vec::new();
    let mut entries_total = 0usize;
    for (j, r) in rules_in.iter().enumerate() {
        let mut unsupported = Vec::new();
        if r.get("when").is_some_and(|w| !w.is_null()) {
            unsupported.push("when".to_string());
        }
        let sources = entries(r, "from", "source")?
            .into_iter()
            .map(|s| source(s, &mut unsupported))
            .collect::<Result<Vec<_>, _>>()?;
        let operations = entries(r, "to", "operation")?
            .into_iter()
            .map(|o| operation(o, &mut unsupported))
            .collect::<Result<Vec<_>, _>>()?;
        if !unsupported.is_empty() {
            unsupported.sort();
            unsupported.dedup();
            let fields = unsupported.join(", ");
            if action == Action::Allow {
                // ztunnel's rule: an ALLOW rule it cannot fully check
                // matches nothing, so it never allows more than written.
                out.notes.push(format!("rules[{j}] uses {fields}, which an L4 proxy cannot check: it matches nothing"));
                continue;
            }
            out.notes.push(format!(
                "rules[{j}] uses {fields}, which an L4 proxy cannot check: its L4 part is enforced, denying more than the full rule"
            ));
        }
        if rules.len() + sources.len() * operations.len() > MAX_RULES {
            return Err(format!("more than {MAX_RULES} source × operation combinations"));
        }
        let source_entries: usize = sources.iter().map(entry_count).sum();
        let operation_entries: usize = operations.iter().map(|(p, n)| p.len() + n.len()).sum();
        entries_total += source_entries * operations.len() + operation_entries * sources.len();
        if entries_total > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} principals, namespaces, blocks and ports once expanded"));
        }
        for s in &sources {
            for (ports, not_ports) in &operations {
                rules.push(Rule { ports: ports.clone(), not_ports: not_ports.clone(), ..s.clone() });
            }
        }
    }
    if out.notes.len() > MAX_NOTES {
        let more = out.notes.len() - MAX_NOTES;
        out.notes.truncate(MAX_NOTES);
        out.notes.push(format!("… and {more} more"));
    }
    out.policy = Some(AuthorizationPolicy { key, selector, action, rules });
    Ok(out)
}

fn entry_count(r: &Rule) -> usize {
    r.principals.len()
        + r.not_principals.len()
        + r.namespaces.len()
        + r.not_namespaces.len()
        + r.ip_blocks.len()
        + r.not_ip_blocks.len()
}

/// [`translate`], failing closed: a policy that cannot be read is not
/// skipped (skipping the only ALLOW of a namespace would allow everything)
/// but applied as what denies the most — an ALLOW that matches nothing, or
/// a DENY of everything — for its selector (for the whole namespace when
/// the selector itself is unreadable), and reported.
pub fn translate_or_fail_closed(key: ObjectKey, spec: &Value) -> Translated {
    let why = match translate(key.clone(), spec) {
        Ok(t) => return t,
        Err(why) => why,
    };
    let action = match spec.get("action").and_then(Value::as_str) {
        Some("ALLOW") | None => Action::Allow,
        _ => Action::Deny,
    };
    let selector = spec
        .get("selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
        .and_then(|m| m.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect::<Option<_>>())
        .map(|match_labels| Selector { match_labels, ..Selector::default() });
    let scope = if selector.is_some() { "its selected pods" } else { "every pod of its namespace" };
    let (rules, effect) = match action {
        Action::Allow => (Vec::new(), "an ALLOW that matches nothing"),
        Action::Deny => (vec![Rule::default()], "a DENY of every connection"),
    };
    Translated {
        policy: Some(AuthorizationPolicy { key, selector, action, rules }),
        notes: vec![format!("malformed ({why}): enforced fail-closed as {effect} for {scope}")],
    }
}
