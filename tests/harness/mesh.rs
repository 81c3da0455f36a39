//! A meshed sandbox: nodes with pods, one mesh file per node (pods of
//! other nodes listed by address), a built-in CA, and a proxy per node
//! started on demand.

use std::path::PathBuf;

use anyhow::Result;

use crate::{
    proxy::{ca_init, ca_issue, node_pods_yaml},
    Pod, ProxyProcess, Sandbox,
};

pub struct Mesh {
    pub sb: Sandbox,
    pub pods: Vec<Pod>,
    /// `files[k]`: node k's mesh file.
    pub files: Vec<PathBuf>,
    /// The built-in CA's directory (`--ca-dir`).
    pub ca: PathBuf,
}

impl Mesh {
    /// `meshed[k]` names the meshed pods of node k; `unmeshed` pods are
    /// created on their node but left out of the mesh files.
    pub fn new(meshed: &[&[&str]], unmeshed: &[(usize, &str)]) -> Result<Self> {
        let mut sb = Sandbox::new()?;
        for _ in 1..meshed.len() {
            sb.add_node()?;
        }
        let mut pods = Vec::new();
        for (node, names) in meshed.iter().enumerate() {
            for name in names.iter() {
                pods.push(sb.add_pod(node, name)?);
            }
        }
        let count = pods.len();
        for (node, name) in unmeshed {
            pods.push(sb.add_pod(*node, name)?);
        }
        let ca = sb.dir.join("ca");
        ca_init(&ca)?;
        let files = (0..meshed.len()).map(|k| sb.dir.join(format!("mesh-n{k}.yaml"))).collect();
        let mesh = Self { sb, pods, files, ca };
        mesh.write_files(&mesh.pods[..count].iter().collect::<Vec<_>>(), "")?;
        Ok(mesh)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod exists")
    }

    /// Writes every node's mesh file listing `meshed`, with `extra` YAML
    /// appended (more pods, services, policies).
    pub fn write_files(&self, meshed: &[&Pod], extra: &str) -> Result<()> {
        for (node, file) in self.files.iter().enumerate() {
            ProxyProcess::write_pods_file(file, &format!("{}{extra}", node_pods_yaml(node, meshed)))?;
        }
        Ok(())
    }

    /// Node `node`'s proxy with the built-in CA (every meshed pod gets a
    /// tunnel port), ready.
    pub fn start(&self, node: usize, extra: &[&str]) -> Result<ProxyProcess> {
        let ca = self.ca.display().to_string();
        let mut args = vec!["--ca-dir", ca.as_str()];
        args.extend_from_slice(extra);
        ProxyProcess::start(&self.sb, node, self.files[node].clone(), &args)
    }

    /// A valid certificate of the mesh for identity `name` (its service
    /// account), for a client that is no proxy.
    pub fn client_cert(&self, name: &str) -> Result<String> {
        let dir = self.sb.dir.join(format!("cert-{name}"));
        ca_issue(&self.ca, name, &dir, &[])?;
        Ok(dir.display().to_string())
    }
}
