//! L4 authorization: may this source identity reach this pod on this port?
//!
//! Istio's evaluation order: any matching `deny` policy refuses; else, if
//! any `allow` policy selects the destination, one of them must match;
//! else the connection is allowed. A plaintext connection has the empty
//! principal and namespace, as in Istio: `principals: ["*"]` requires an
//! identity, and `notPrincipals: ["*"]` matches plaintext (the usual
//! "require mTLS" DENY).
//! Policies come from the store per destination namespace, so rule changes
//! apply to new connections as soon as they are published.
#![forbid(unsafe_code)]

use std::{net::IpAddr, sync::Arc};

use crate::{
    identity::Identity,
    model::{Action, AuthorizationPolicy, Rule, Workload},
};

/// The outcome, with the deciding policy for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String },
}

/// Istio's string match: exact, `*` (any non-empty value), `prefix*` or
/// `*suffix`.
fn pattern_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => value.ends_with(suffix),
        None => value == pattern,
    }
}

/// Who is connecting: the peer's identity (`None`: plaintext) and address
/// (for a tunnelled connection, the source pod's).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub identity: Option<&'a Identity>,
    pub ip: IpAddr,
}

/// The source as rules see it: principal and namespace (empty for
/// plaintext), computed once per connection, not per rule.
struct Peer<'a> {
    ip: IpAddr,
    principal: String,
    namespace: &'a str,
}

fn rule_matches(rule: &Rule, from: &Peer<'_>, port: u16) -> bool {
    let ip = from.ip;
    let ip_ok = rule.ip_blocks.is_empty() || rule.ip_blocks.iter().any(|b| b.contains(&ip));
    let not_ip_ok = !rule.not_ip_blocks.iter().any(|b| b.contains(&ip));
    let port_ok = (rule.ports.is_empty() || rule.ports.contains(&port)) && !rule.not_ports.contains(&port);
    if !(ip_ok && not_ip_ok && port_ok) {
        return false;
    }
    let (id, ns) = (from.principal.as_str(), from.namespace);
    let principal_ok = rule.principals.is_empty() || rule.principals.iter().any(|p| pattern_matches(p, id));
    let not_principal_ok = !rule.not_principals.iter().any(|p| pattern_matches(p, id));
    let namespace_ok = rule.namespaces.is_empty() || rule.namespaces.iter().any(|n| pattern_matches(n, ns));
    let not_namespace_ok = !rule.not_namespaces.iter().any(|n| pattern_matches(n, ns));
    principal_ok && not_principal_ok && namespace_ok && not_namespace_ok
}

fn selects(policy: &AuthorizationPolicy, pod: &Workload) -> bool {
    if policy.key.namespace != pod.key.namespace {
        return false;
    }
    let Some(sel) = &policy.selector else { return true };
    (sel.pods.is_empty() || sel.pods.iter().any(|p| **p == *pod.key.name))
        && (sel.service_accounts.is_empty() || sel.service_accounts.iter().any(|s| **s == *pod.service_account))
        && sel.match_labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

fn matches(policy: &AuthorizationPolicy, source: &Peer<'_>, port: u16) -> bool {
    policy.rules.iter().any(|r| rule_matches(r, source, port))
}

/// Decides for a connection from `source` to `destination`'s `port`, given
/// the policies of the destination's namespace.
pub fn check(policies: &[Arc<AuthorizationPolicy>], destination: &Workload, source: Source<'_>, port: u16) -> Decision {
    let mut allow_policies = 0;
    let mut allowed = false;
    let mut selected = policies.iter().filter(|p| selects(p, destination)).peekable();
    if selected.peek().is_none() {
        return Decision::Allow;
    }
    let source = Peer {
        ip: crate::model::canonical_ip(source.ip),
        principal: source.identity.map(ToString::to_string).unwrap_or_default(),
        namespace: source.identity.map(|s| &*s.namespace).unwrap_or(""),
    };
    let source = &source;
    for p in selected {
        match p.action {
            Action::Deny if matches(p, source, port) => return Decision::Deny { policy: p.key.to_string() },
            Action::Deny => {}
            Action::Allow => {
                allow_policies += 1;
                allowed |= matches(p, source, port);
            }
        }
    }
    if allow_policies > 0 && !allowed {
        return Decision::Deny { policy: "no allow policy matched".into() };
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectKey, Selector};

    fn pod() -> Workload {
        Workload {
            uid: "u".into(),
            key: ObjectKey::new("default", "b"),
            service_account: "b".into(),
            node: None,
            ips: vec![],
            labels: [("app".to_string(), "db".to_string())].into(),
            netns: None,
        }
    }

    fn policy(name: &str, action: Action, selector: Option<Selector>, rules: Vec<Rule>) -> Arc<AuthorizationPolicy> {
        Arc::new(AuthorizationPolicy { key: ObjectKey::new("default", name), selector, action, rules })
    }

    fn principals(p: &[&str]) -> Rule {
        Rule { principals: p.iter().map(|s| s.to_string()).collect(), ..Rule::default() }
    }

    fn src(identity: Option<&Identity>) -> Source<'_> {
        Source { identity, ip: "10.0.0.9".parse().expect("test data") }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    #[test]
    fn deny_matching_principal() {
        let ps = [policy("no-a", Action::Deny, None, vec![principals(&["spiffe://cluster.local/ns/default/sa/a"])])];
        assert!(matches!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Deny { .. }));
        assert_eq!(check(&ps, &pod(), src(Some(&id("c"))), 80), Decision::Allow);
    }

    #[test]
    fn allow_lists_are_exclusive_and_ports_count() {
        let rule = Rule { ports: vec![8080], ..principals(&["spiffe://cluster.local/ns/default/sa/a"]) };
        let sel = Selector { pods: vec!["b".into()], ..Selector::default() };
        let ps = [policy("only-a", Action::Allow, Some(sel), vec![rule])];
        assert_eq!(check(&ps, &pod(), src(Some(&id("a"))), 8080), Decision::Allow);
        assert!(matches!(check(&ps, &pod(), src(Some(&id("a"))), 9090), Decision::Deny { .. }));
        assert!(matches!(check(&ps, &pod(), src(Some(&id("c"))), 8080), Decision::Deny { .. }));
        assert!(matches!(check(&ps, &pod(), src(None), 8080), Decision::Deny { .. }), "plaintext has no principal");
    }

    #[test]
    fn deny_beats_allow_in_any_order_and_wildcards_work() {
        let all =
            policy("all", Action::Allow, None, vec![Rule { namespaces: vec!["default".into()], ..Rule::default() }]);
        let no_x = policy("no-x", Action::Deny, None, vec![principals(&["spiffe://cluster.local/ns/default/sa/x*"])]);
        for ps in [[all.clone(), no_x.clone()], [no_x, all]] {
            assert_eq!(check(&ps, &pod(), src(Some(&id("a"))), 1), Decision::Allow);
            assert!(matches!(check(&ps, &pod(), src(Some(&id("xray"))), 1), Decision::Deny { .. }));
            let other = Identity::new("cluster.local", "other", "a");
            assert!(matches!(check(&ps, &pod(), src(Some(&other)), 1), Decision::Deny { .. }));
            let suffix = policy("only-a", Action::Allow, None, vec![principals(&["*/sa/a"])]);
            assert_eq!(check(std::slice::from_ref(&suffix), &pod(), src(Some(&id("a"))), 1), Decision::Allow);
            assert!(matches!(check(&[suffix], &pod(), src(Some(&id("b"))), 1), Decision::Deny { .. }));
        }
    }

    #[test]
    fn selectors_and_negations() {
        let sel = |labels: &[(&str, &str)]| Selector {
            match_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Selector::default()
        };
        let ps = [policy("web-only", Action::Deny, Some(sel(&[("app", "web")])), vec![Rule::default()])];
        assert_eq!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Allow, "labels do not select b");
        let ps = [policy("db", Action::Deny, Some(sel(&[("app", "db")])), vec![Rule::default()])];
        let nothing = [policy("allow-nothing", Action::Allow, Some(sel(&[("app", "db")])), vec![])];
        assert!(matches!(check(&nothing, &pod(), src(Some(&id("a"))), 80), Decision::Deny { .. }), "no rules");
        assert!(matches!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Deny { .. }));
        let not_a = Rule { not_principals: vec!["spiffe://cluster.local/ns/default/sa/a".into()], ..Rule::default() };
        let ps = [policy("not-a", Action::Allow, None, vec![not_a])];
        assert_eq!(check(&ps, &pod(), src(Some(&id("c"))), 80), Decision::Allow);
        assert!(matches!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Deny { .. }));
        assert_eq!(check(&ps, &pod(), src(None), 80), Decision::Allow, "plaintext is the empty principal: not `a`");
        // Istio's "require mTLS": DENY notPrincipals ["*"] refuses plaintext
        // only; ALLOW principals ["*"] admits any identity, no plaintext.
        let any = |field: &str| {
            let v = vec!["*".to_string()];
            if field == "not" {
                Rule { not_principals: v, ..Rule::default() }
            } else {
                Rule { principals: v, ..Rule::default() }
            }
        };
        let ps = [policy("require-mtls", Action::Deny, None, vec![any("not")])];
        assert!(matches!(check(&ps, &pod(), src(None), 80), Decision::Deny { .. }));
        assert_eq!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Allow);
        let ps = [policy("any-identity", Action::Allow, None, vec![any("yes")])];
        assert!(matches!(check(&ps, &pod(), src(None), 80), Decision::Deny { .. }));
        assert_eq!(check(&ps, &pod(), src(Some(&id("a"))), 80), Decision::Allow);
        let not_ns = Rule { not_namespaces: vec!["*".into()], ..Rule::default() };
        let ps = [policy("plaintext-ns", Action::Deny, None, vec![not_ns])];
        assert!(
            matches!(check(&ps, &pod(), src(None), 80), Decision::Deny { .. }),
            "plaintext has the empty namespace"
        );
    }

    #[test]
    fn ip_blocks_and_not_ports() {
        let block = |s: &str| vec![s.parse().expect("test data")];
        let rule = Rule { ip_blocks: block("10.0.0.0/24"), not_ports: vec![22], ..Rule::default() };
        let ps = [policy("lan", Action::Allow, None, vec![rule])];
        assert_eq!(check(&ps, &pod(), src(None), 80), Decision::Allow, "plaintext from the block");
        assert!(matches!(check(&ps, &pod(), src(None), 22), Decision::Deny { .. }), "notPorts");
        let far = Source { identity: Some(&id("a")), ip: "10.0.1.9".parse().expect("test data") };
        assert!(matches!(check(&ps, &pod(), far, 80), Decision::Deny { .. }), "outside the block");
        let mapped = Source { identity: None, ip: "::ffff:10.0.0.7".parse().expect("test data") };
        assert_eq!(check(&ps, &pod(), mapped, 80), Decision::Allow, "v4-mapped is v4");
        let not = Rule { not_ip_blocks: block("10.0.0.0/24"), ..Rule::default() };
        let ps = [policy("not-lan", Action::Deny, None, vec![not])];
        assert_eq!(check(&ps, &pod(), src(None), 80), Decision::Allow);
        assert!(matches!(check(&ps, &pod(), far, 80), Decision::Deny { .. }));
    }

    #[test]
    fn policies_of_other_namespaces_do_not_apply() {
        let p = Arc::new(AuthorizationPolicy {
            key: ObjectKey::new("shop", "elsewhere"),
            selector: None,
            action: Action::Deny,
            rules: vec![Rule::default()],
        });
        assert_eq!(check(&[p], &pod(), src(Some(&id("a"))), 80), Decision::Allow);
    }
}
