//! Driving the HTTP layer from a pod: mesh-file services for the origins,
//! and keep-alive request runs (py/client.py) summarised as JSON.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{mesh::Mesh, servers::python, Pod};

/// Services (name, VIP, endpoint pods) as mesh-file YAML, port 80 →
/// `target_port`, declared HTTP.
pub fn services_yaml(target_port: u16, services: &[(&str, &str, &[&str])]) -> String {
    let mut out = String::from("services:\n");
    for (name, vip, pods) in services {
        out.push_str(&format!(
            "  - name: {name}\n    vips: [\"{vip}\"]\n    ports: [{{port: 80, targetPort: {target_port}, protocol: http}}]\n    endpoints:\n"
        ));
        for pod in pods.iter() {
            out.push_str(&format!("      - {{pod: {pod}}}\n"));
        }
    }
    out
}

/// `count` keep-alive requests of `path` from `pod` to `host`:80
/// (py/client.py); `headers` as "name:value" ("method:POST" sets the
/// method, "body:N" sends N bytes).
pub fn drive(mesh: &Mesh, pod: &Pod, host: &str, path: &str, count: usize, headers: &[&str]) -> Result<Value> {
    let count = count.to_string();
    let mut args = vec![host, "80", path, &count];
    args.extend_from_slice(headers);
    let out = mesh.sb.run(python(&mesh.sb, pod, "client.py", &args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .with_context(|| format!("client.py: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// A count from a client.py summary (`group`: "statuses" or "bodies").
pub fn n(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key].as_u64().unwrap_or(0)
}

/// Lines of an origin's request log.
pub fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// Lines of an origin's request log that start with `prefix`.
pub fn lines_starting(path: &std::path::Path, prefix: &str) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().filter(|l| l.starts_with(prefix)).count()).unwrap_or(0)
}
