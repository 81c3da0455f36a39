//! L4 authorization: may this source identity reach this pod on this port?
//!
//! Istio's evaluation order: any matching `deny` policy refuses; else, if
//! any `allow` policy selects the destination, one of them must match;
//! else the connection is allowed. Policies come from the mesh file and are
//! swapped in on reload, so rule changes apply to new connections.
#![forbid(unsafe_code)]

use crate::{
    identity::Identity,
    mesh::{
        authz::{Action, AuthorizationPolicy, Rule},
        PodSpec,
    },
};

/// The outcome, with the deciding policy for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { policy: String },
}

#[derive(Debug, Default)]
pub struct Authorizer {
    policies: Vec<AuthorizationPolicy>,
}

fn principal_matches(pattern: &str, source: Option<&Identity>) -> bool {
    let Some(source) = source else { return false };
    let id = source.to_string();
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => id == pattern,
    }
}

fn rule_matches(rule: &Rule, source: Option<&Identity>, port: u16) -> bool {
    (rule.principals.is_empty() || rule.principals.iter().any(|p| principal_matches(p, source)))
        && (rule.namespaces.is_empty() || source.is_some_and(|s| rule.namespaces.contains(&s.namespace)))
        && (rule.ports.is_empty() || rule.ports.contains(&port))
}

impl Authorizer {
    pub fn new(policies: Vec<AuthorizationPolicy>) -> Self {
        Self { policies }
    }

    fn selects(policy: &AuthorizationPolicy, pod: &PodSpec) -> bool {
        if policy.namespace != pod.namespace {
            return false;
        }
        match &policy.selector {
            None => true,
            Some(sel) => sel.pods.contains(&pod.name) || sel.service_accounts.contains(&pod.service_account),
        }
    }

    fn matches(policy: &AuthorizationPolicy, source: Option<&Identity>, port: u16) -> bool {
        policy.rules.is_empty() || policy.rules.iter().any(|r| rule_matches(r, source, port))
    }

    /// `source` is `None` for plaintext (unauthenticated) connections.
    pub fn check(&self, destination: &PodSpec, source: Option<&Identity>, port: u16) -> Decision {
        let selecting = self.policies.iter().filter(|p| Self::selects(p, destination));
        let mut allow_policies = 0;
        for p in selecting {
            match p.action {
                Action::Deny if Self::matches(p, source, port) => {
                    return Decision::Deny { policy: format!("{}/{}", p.namespace, p.name) };
                }
                Action::Deny => {}
                Action::Allow if Self::matches(p, source, port) => return self.no_deny(destination, source, port),
                Action::Allow => allow_policies += 1,
            }
        }
        if allow_policies > 0 {
            return Decision::Deny { policy: "no allow policy matched".into() };
        }
        Decision::Allow
    }

    /// An allow matched; a deny listed after it still wins.
    fn no_deny(&self, destination: &PodSpec, source: Option<&Identity>, port: u16) -> Decision {
        for p in self.policies.iter().filter(|p| Self::selects(p, destination) && p.action == Action::Deny) {
            if Self::matches(p, source, port) {
                return Decision::Deny { policy: format!("{}/{}", p.namespace, p.name) };
            }
        }
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::parse_for_test;

    fn setup(policies: &str) -> (Authorizer, PodSpec) {
        let text = format!(
            "pods:\n  - {{name: b, serviceAccount: b, netns: /n/b, ips: [10.0.0.2]}}\nauthorization:\n{policies}"
        );
        let state = parse_for_test(&text).expect("valid");
        let pod = state.pods.values().next().expect("pod").clone();
        (Authorizer::new(state.authorization), pod)
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    #[test]
    fn deny_matching_principal() {
        let (authz, b) = setup(
            "  - {name: no-a, action: deny, rules: [{principals: ['spiffe://cluster.local/ns/default/sa/a']}]}\n",
        );
        assert!(matches!(authz.check(&b, Some(&id("a")), 80), Decision::Deny { .. }));
        assert_eq!(authz.check(&b, Some(&id("c")), 80), Decision::Allow);
    }

    #[test]
    fn allow_lists_are_exclusive_and_ports_count() {
        let (authz, b) = setup("  - {name: only-a, action: allow, selector: {pods: [b]}, rules: [{principals: ['spiffe://cluster.local/ns/default/sa/a'], ports: [8080]}]}\n");
        assert_eq!(authz.check(&b, Some(&id("a")), 8080), Decision::Allow);
        assert!(matches!(authz.check(&b, Some(&id("a")), 9090), Decision::Deny { .. }));
        assert!(matches!(authz.check(&b, Some(&id("c")), 8080), Decision::Deny { .. }));
        assert!(matches!(authz.check(&b, None, 8080), Decision::Deny { .. }), "plaintext has no principal");
    }

    #[test]
    fn deny_beats_allow_and_namespaces_and_wildcards_work() {
        let (authz, b) = setup(
            "  - {name: all, action: allow, rules: [{namespaces: [default]}]}\n  - {name: no-x, action: deny, rules: [{principals: ['spiffe://cluster.local/ns/default/sa/x*']}]}\n",
        );
        assert_eq!(authz.check(&b, Some(&id("a")), 1), Decision::Allow);
        assert!(matches!(authz.check(&b, Some(&id("xray")), 1), Decision::Deny { .. }));
        assert!(matches!(
            authz.check(&b, Some(&Identity::new("cluster.local", "other", "a")), 1),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn policies_of_other_namespaces_or_pods_do_not_apply() {
        let (authz, b) = setup("  - {name: elsewhere, namespace: shop, action: deny}\n  - {name: other-pod, action: deny, selector: {pods: [z]}}\n");
        assert_eq!(authz.check(&b, Some(&id("a")), 80), Decision::Allow);
    }

    #[test]
    fn invalid_policies_are_refused() {
        let text = "authorization:\n  - {name: p, action: deny, rules: [{principals: ['sa/a']}]}\n";
        assert!(parse_for_test(text).expect_err("bad principal").to_string().contains("spiffe://"));
        assert!(parse_for_test("authorization:\n  - {name: p, action: maybe}\n").is_err());
    }
}
