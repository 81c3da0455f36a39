//! Label and field selectors, parsed from the query string and matched
//! against the stored JSON (so a malformed object is still selectable by its
//! labels, as it is by a real API server, which stores it as bytes).

use serde_json::Value;

use super::Kind;

/// One label requirement (`k=v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
/// `k`, `!k`).
#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

/// A parsed `fieldSelector`: every `(field, value, equal?)` must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, String, bool)>);

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<LabelReq, String> {
    let err = || format!("unable to parse requirement: {part:?}");
    if let Some(open) = part.find('(') {
        let close = part.rfind(')').ok_or_else(err)?;
        if close + 1 != part.len() || close < open {
            return Err(err());
        }
        let head: Vec<&str> = part[..open].split_whitespace().collect();
        let [key, op] = head.as_slice() else {
            return Err(err());
        };
        let values: Vec<String> = part[open + 1..close].split(',').map(|v| v.trim().to_string()).collect();
        if !valid_key(key) || values.iter().any(|v| !valid_value(v)) {
            return Err(err());
        }
        return match *op {
            "in" => Ok(LabelReq::In(key.to_string(), values)),
            "notin" => Ok(LabelReq::NotIn(key.to_string(), values)),
            _ => Err(err()),
        };
    }
    let checked = |key: &str, value: &str| {
        let (key, value) = (key.trim(), value.trim());
        if valid_key(key) && valid_value(value) {
            Ok((key.to_string(), value.to_string()))
        } else {
            Err(err())
        }
    };
    if let Some((k, v)) = part.split_once("!=") {
        let (k, v) = checked(k, v)?;
        Ok(LabelReq::NotEq(k, v))
    } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        let (k, v) = checked(k, v)?;
        Ok(LabelReq::Eq(k, v))
    } else if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        if valid_key(key) {
            Ok(LabelReq::NotExists(key.to_string()))
        } else {
            Err(err())
        }
    } else if valid_key(part) {
        Ok(LabelReq::Exists(part.to_string()))
    } else {
        Err(err())
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top_level(s) {
            reqs.push(parse_requirement(part.trim())?);
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `obj`'s `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The value a real API server exposes for `field` of `kind`, or `None` if
/// it does not support selecting on that field (it answers 400 then).
/// Missing fields read as `""` (so `spec.nodeName=` selects unscheduled
/// pods), `spec.hostNetwork` as `"false"`.
fn field_value(kind: Kind, obj: &Value, field: &str) -> Option<String> {
    let text = |pointer: &str| obj.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string();
    match (kind, field) {
        (_, "metadata.name") => Some(text("/metadata/name")),
        (_, "metadata.namespace") => Some(text("/metadata/namespace")),
        (
            Kind::Pod,
            "spec.nodeName"
            | "spec.restartPolicy"
            | "spec.schedulerName"
            | "spec.serviceAccountName"
            | "status.phase"
            | "status.podIP"
            | "status.nominatedNodeName",
        )
        | (Kind::Service, "spec.clusterIP" | "spec.type")
        | (Kind::Namespace, "status.phase") => Some(text(&format!("/{}", field.replace('.', "/")))),
        (Kind::Pod, "spec.hostNetwork") => {
            Some(obj.pointer("/spec/hostNetwork").and_then(Value::as_bool).unwrap_or(false).to_string())
        }
        _ => None,
    }
}

impl FieldSelector {
    /// Parses `f=v`, `f==v`, `f!=v` terms and checks each field is one the
    /// API server supports for `kind`.
    pub fn parse(kind: Kind, s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(terms));
        }
        for part in s.split(',') {
            let part = part.trim();
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand it"));
            };
            let field = field.trim();
            if field_value(kind, &Value::Null, field).is_none() {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), value.trim().to_string(), equal));
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.0.iter().all(|(field, value, equal)| {
            let actual = field_value(kind, obj, field).unwrap_or_default();
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_requirements() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| LabelSelector::parse(s).expect(s).matches(&obj);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("missing notin (web)"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m(""));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_terms() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let m = |s: &str| FieldSelector::parse(Kind::Pod, s).expect(s).matches(Kind::Pod, &pod);
        assert!(m("spec.nodeName=n1"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("metadata.name=p,metadata.namespace==ns"));
        assert!(m("spec.hostNetwork=false"));
        assert!(m("status.phase="));
        assert!(FieldSelector::parse(Kind::Pod, "spec.containers=x").is_err());
        assert!(FieldSelector::parse(Kind::Service, "spec.nodeName=x").is_err());
    }
}
