//! The Kubernetes deployment (`deploy/kubernetes`) and the container image.
//!
//! Renders the kustomize base and the `with-crd` overlay with `kubectl
//! kustomize`, validates every rendered object against the OpenAPI schemas
//! of Kubernetes 1.32 — the oldest version the project supports (k8s-openapi's
//! `v1_32`) — with kubernetes-validate in strict mode (an unknown field is an
//! error, and so is a kind it has no schema for), then asserts what a schema
//! cannot: the capability set and the rest of the security context, probes,
//! `NODE_NAME` from the downward API, RBAC verbs, the host mounts and the
//! flags that point at them, the update strategy, resources, and the CRD.
//!
//! With `OUTRIGGER_IMAGE` set (`cargo xtask test` builds the image with
//! `cargo xtask image` and sets it; a test cannot run cargo or buildah
//! itself), the image is run with podman.
//!
//! Needs kubectl and kubernetes-validate (`cargo xtask setup`); no cluster,
//! no root (but podman, for the image, as root).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// The oldest Kubernetes the project supports (k8s-openapi's `v1_32`).
const OLDEST_KUBERNETES: &str = "1.32.0";
const NAMESPACE: &str = "outrigger-system";
const NAME: &str = "outrigger";
/// The image the DaemonSet names, and `cargo xtask image` builds.
const IMAGE: &str = "outrigger:dev";

/// What the proxy needs, and nothing else; each is justified in the manifest.
const CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

/// (API group, resource) → verbs: the kinds `--kubernetes` watches, and events.
fn expected_rbac() -> BTreeMap<(String, String), BTreeSet<String>> {
    let read = ["get", "list", "watch"];
    let write_events = ["create", "patch"];
    let rules: [(&str, &str, &[&str]); 7] = [
        ("", "pods", &read),
        ("", "services", &read),
        ("", "namespaces", &read),
        ("discovery.k8s.io", "endpointslices", &read),
        ("security.istio.io", "authorizationpolicies", &read),
        ("", "events", &write_events),
        ("events.k8s.io", "events", &write_events),
    ];
    rules
        .into_iter()
        .map(|(group, resource, verbs)| {
            ((group.to_owned(), resource.to_owned()), verbs.iter().map(|v| (*v).to_owned()).collect())
        })
        .collect()
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// One kustomization, rendered and parsed.
struct Rendered {
    yaml: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn new(dir: &Path) -> Result<Self> {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .context("running kubectl (cargo xtask setup installs it)")?;
        ensure!(
            out.status.success(),
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = String::from_utf8(out.stdout).context("kubectl kustomize printed non-UTF-8")?;
        let objects: Vec<Value> = serde_saphyr::from_multiple::<Value>(&yaml)
            .with_context(|| format!("parsing the rendering of {}", dir.display()))?
            .into_iter()
            .filter(|v| !v.is_null())
            .collect();
        ensure!(!objects.is_empty(), "{} renders no objects", dir.display());
        Ok(Self { yaml, objects })
    }

    fn get(&self, kind: &str, name: &str) -> Result<&Value> {
        let found: Vec<&Value> =
            self.objects.iter().filter(|o| o["kind"] == kind && o["metadata"]["name"] == name).collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => bail!("no {kind}/{name} rendered; have {:?}", self.keys()),
            _ => bail!("{kind}/{name} rendered {} times", found.len()),
        }
    }

    /// "Kind/name" of every object, sorted.
    fn keys(&self) -> BTreeSet<String> {
        self.objects.iter().map(key).collect()
    }
}

fn key(object: &Value) -> String {
    format!("{}/{}", str_of(&object["kind"]), str_of(&object["metadata"]["name"]))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| str_of(s).to_owned()).collect()).unwrap_or_default()
}

fn base() -> &'static Rendered {
    static BASE: OnceLock<Rendered> = OnceLock::new();
    BASE.get_or_init(|| Rendered::new(&deploy_dir()).unwrap_or_else(|e| panic!("{e:#}")))
}

fn with_crd() -> &'static Rendered {
    static WITH_CRD: OnceLock<Rendered> = OnceLock::new();
    WITH_CRD.get_or_init(|| Rendered::new(&deploy_dir().join("overlays/with-crd")).unwrap_or_else(|e| panic!("{e:#}")))
}

fn daemonset() -> Result<&'static Value> {
    base().get("DaemonSet", NAME)
}

fn pod_spec() -> Result<&'static Value> {
    Ok(&daemonset()?["spec"]["template"]["spec"])
}

fn container() -> Result<&'static Value> {
    let containers = pod_spec()?["containers"].as_array().context("no containers")?;
    ensure!(containers.len() == 1, "one container expected, found {}", containers.len());
    ensure!(
        pod_spec()?.get("initContainers").is_none(),
        "no init containers expected (they would need their own review)"
    );
    Ok(&containers[0])
}

fn args() -> Result<Vec<String>> {
    Ok(strings(&container()?["args"]))
}

/// The value of `--name` in `args`, written `--name=value` or `--name value`.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')).map(str::to_owned)
        }
    })
}

/// The pod's volume called `name`.
fn volume(name: &str) -> Result<&'static Value> {
    pod_spec()?["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
        .with_context(|| format!("no volume {name}"))
}

/// The container's mount at `path` and the volume behind it.
fn mount_at(path: &str) -> Result<(&'static Value, &'static Value)> {
    let mount = container()?["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
        .with_context(|| format!("nothing mounted at {path}"))?;
    Ok((mount, volume(str_of(&mount["name"]))?))
}

/// Kubernetes memory quantities of the forms the manifest uses, in bytes.
fn bytes(quantity: &str) -> Result<u64> {
    let (number, unit) = quantity.split_at(quantity.find(|c: char| !c.is_ascii_digit()).unwrap_or(quantity.len()));
    let n: u64 = number.parse().with_context(|| format!("quantity {quantity:?}"))?;
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("unexpected quantity {quantity:?}"),
    };
    Ok(n * scale)
}

/// Seconds of a humantime duration the way the manifest writes them (`20s`).
fn seconds(duration: &str) -> Result<u64> {
    duration.strip_suffix('s').and_then(|n| n.parse().ok()).with_context(|| format!("duration {duration:?}"))
}

/// Runs kubernetes-validate on `yaml` for the oldest supported Kubernetes
/// and checks it said "passed" for each of `objects` and nothing else (it
/// only warns, and exits 0, on a kind it has no schema for).
fn validate(what: &str, rendered: &Rendered) -> Result<()> {
    let mut child = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--kubernetes-version", OLDEST_KUBERNETES, "--strict", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3 -m kubernetes_validate")?;
    child.stdin.take().context("stdin")?.write_all(rendered.yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !stderr.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed: cargo xtask setup (or pip install kubernetes-validate)"
    );
    ensure!(out.status.success(), "{what}: kubernetes-validate failed ({}):\n{stdout}{stderr}", out.status);
    let mut passed = BTreeSet::new();
    for line in stdout.lines() {
        // INFO - passed for resource daemonset/outrigger against version 1.32
        let Some(resource) = line.strip_prefix("INFO - passed for resource ") else {
            bail!("{what}: kubernetes-validate said {line:?}");
        };
        let resource = resource.split(" against version ").next().unwrap_or(resource);
        ensure!(line.ends_with(" against version 1.32"), "{what}: validated against another version: {line}");
        passed.insert(resource.to_owned());
    }
    let rendered_keys: BTreeSet<String> = rendered.keys().into_iter().map(|k| k.to_lowercase()).collect();
    ensure!(passed == rendered_keys, "{what}: validated {passed:?}, rendered {rendered_keys:?}\n{stdout}{stderr}");
    eprintln!("{what}: {} objects valid for Kubernetes {OLDEST_KUBERNETES} (strict): {passed:?}", passed.len());
    Ok(())
}

#[test]
fn base_renders_and_validates_against_the_oldest_supported_kubernetes() -> Result<()> {
    let rendered = base();
    let expected: BTreeSet<String> = [
        "Namespace/outrigger-system",
        "ServiceAccount/outrigger",
        "ClusterRole/outrigger",
        "ClusterRoleBinding/outrigger",
        "DaemonSet/outrigger",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    ensure!(rendered.keys() == expected, "base renders {:?}, expected {expected:?}", rendered.keys());
    validate("deploy/kubernetes", rendered)?;
    // deploy/kubernetes is base/ as it is: overlays build on base/.
    let direct = Rendered::new(&deploy_dir().join("base"))?;
    ensure!(direct.yaml == rendered.yaml, "deploy/kubernetes renders differently from deploy/kubernetes/base");
    for object in &rendered.objects {
        ensure!(
            object["metadata"]["labels"]["app.kubernetes.io/name"] == NAME,
            "{} lacks the label app.kubernetes.io/name: {NAME}",
            key(object)
        );
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&str_of(&object["kind"]));
        let namespace = &object["metadata"]["namespace"];
        ensure!(
            if cluster_scoped { namespace.is_null() } else { namespace == NAMESPACE },
            "{} has namespace {namespace}",
            key(object)
        );
    }
    // hostPID, hostPath and added capabilities are beyond the baseline Pod Security level.
    let ns = rendered.get("Namespace", NAMESPACE)?;
    ensure!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged", "namespace PSA level");
    Ok(())
}

#[test]
fn overlay_adds_exactly_the_authorizationpolicy_crd_and_validates() -> Result<()> {
    let (base, overlay) = (base(), with_crd());
    validate("deploy/kubernetes/overlays/with-crd", overlay)?;
    let crd_key = "CustomResourceDefinition/authorizationpolicies.security.istio.io";
    let mut expected = base.keys();
    expected.insert(crd_key.to_owned());
    ensure!(overlay.keys() == expected, "overlay renders {:?}, expected {expected:?}", overlay.keys());
    for object in &base.objects {
        ensure!(
            overlay.get(str_of(&object["kind"]), str_of(&object["metadata"]["name"]))? == object,
            "{} differs",
            key(object)
        );
    }

    let crd = overlay.get("CustomResourceDefinition", "authorizationpolicies.security.istio.io")?;
    let spec = &crd["spec"];
    ensure!(spec["group"] == "security.istio.io" && spec["scope"] == "Namespaced", "group/scope: {spec}");
    ensure!(
        spec["names"]["kind"] == "AuthorizationPolicy"
            && spec["names"]["plural"] == "authorizationpolicies"
            && spec["names"]["listKind"] == "AuthorizationPolicyList",
        "names: {}",
        spec["names"]
    );
    let versions = spec["versions"].as_array().context("versions")?;
    let v1 = versions.iter().find(|v| v["name"] == "v1").context("no v1 version")?;
    ensure!(v1["served"] == true && v1["storage"] == true, "v1 must be served and stored: {v1}");
    ensure!(versions.iter().filter(|v| v["storage"] == true).count() == 1, "exactly one storage version");
    for version in versions {
        let name = str_of(&version["name"]);
        let schema = &version["schema"]["openAPIV3Schema"];
        structural(schema, &format!("{name}.openAPIV3Schema"))?;
        let spec_schema = &schema["properties"]["spec"];
        ensure!(spec_schema["x-kubernetes-preserve-unknown-fields"] == true, "{name}: spec keeps unknown fields");
        // The L4 subset the proxy reads is spelled out, so typos are refused by the API server.
        let rule = &spec_schema["properties"]["rules"]["items"]["properties"];
        for (path, node) in [
            ("selector.matchLabels", &spec_schema["properties"]["selector"]["properties"]["matchLabels"]),
            ("action", &spec_schema["properties"]["action"]),
            ("from.source.principals", &rule["from"]["items"]["properties"]["source"]["properties"]["principals"]),
            (
                "from.source.notPrincipals",
                &rule["from"]["items"]["properties"]["source"]["properties"]["notPrincipals"],
            ),
            ("from.source.namespaces", &rule["from"]["items"]["properties"]["source"]["properties"]["namespaces"]),
            (
                "from.source.notNamespaces",
                &rule["from"]["items"]["properties"]["source"]["properties"]["notNamespaces"],
            ),
            ("from.source.ipBlocks", &rule["from"]["items"]["properties"]["source"]["properties"]["ipBlocks"]),
            ("to.operation.ports", &rule["to"]["items"]["properties"]["operation"]["properties"]["ports"]),
        ] {
            ensure!(node.is_object(), "{name}: the schema lacks {path}");
        }
        ensure!(
            strings(&spec_schema["properties"]["action"]["enum"]) == ["ALLOW", "DENY", "AUDIT", "CUSTOM"],
            "{name}: action values"
        );
    }
    Ok(())
}

/// The API server's structural-schema rule, as far as this CRD uses it:
/// every node has a type, unless it keeps unknown fields or is int-or-string.
fn structural(schema: &Value, path: &str) -> Result<()> {
    let typed = schema["type"].is_string()
        || schema["x-kubernetes-preserve-unknown-fields"] == true
        || schema["x-kubernetes-int-or-string"] == true;
    ensure!(typed, "{path}: no type (not a structural schema)");
    if let Some(properties) = schema["properties"].as_object() {
        for (name, child) in properties {
            structural(child, &format!("{path}.{name}"))?;
        }
    }
    for child in ["items", "additionalProperties"] {
        if schema[child].is_object() {
            structural(&schema[child], &format!("{path}.{child}"))?;
        }
    }
    Ok(())
}

#[test]
fn proxy_runs_with_exactly_the_justified_capabilities_and_no_more() -> Result<()> {
    let pod = pod_spec()?;
    ensure!(pod["hostNetwork"].is_null() || pod["hostNetwork"] == false, "hostNetwork must be off");
    ensure!(pod["hostPID"] == true, "hostPID: the loop guard compares the proxy's host tgid");
    ensure!(pod["hostIPC"].is_null() || pod["hostIPC"] == false, "hostIPC must be off");
    ensure!(pod["securityContext"]["sysctls"].is_null(), "no pod sysctls");
    let sc = &container()?["securityContext"];
    ensure!(sc["privileged"].is_null() || sc["privileged"] == false, "never privileged: {sc}");
    ensure!(sc["readOnlyRootFilesystem"] == true, "read-only root filesystem: {sc}");
    ensure!(strings(&sc["capabilities"]["drop"]) == ["ALL"], "drop ALL: {sc}");
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let justified: BTreeSet<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    ensure!(added == justified, "capabilities added {added:?}, justified {justified:?}");
    // The API server refuses `allowPrivilegeEscalation: false` next to an
    // added capability spelled "CAP_SYS_ADMIN" (and "privileged: true");
    // Kubernetes capability names carry no prefix anyway.
    ensure!(added.iter().all(|c| !c.starts_with("CAP_")), "capabilities are named without CAP_: {added:?}");
    ensure!(sc["allowPrivilegeEscalation"] == false, "no_new_privs: {sc}");
    ensure!(sc["runAsUser"] == 0, "root, holding only the capabilities above: {sc}");
    ensure!(sc["seccompProfile"]["type"] == "RuntimeDefault", "the runtime's seccomp profile: {sc}");
    ensure!(
        pod["securityContext"]["seccompProfile"].is_null()
            || pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault",
        "pod-level seccomp"
    );
    Ok(())
}

#[test]
fn probes_reach_live_and_ready_on_the_admin_port() -> Result<()> {
    let c = container()?;
    let ports = c["ports"].as_array().context("ports")?;
    let admin = ports.iter().find(|p| p["name"] == "admin").context("no port named admin")?;
    ensure!(admin["containerPort"] == 15000, "admin port: {admin}");
    ensure!(
        flag(&args()?, "--admin-addr").as_deref() == Some("0.0.0.0:15000"),
        "--admin-addr on the pod IP, port 15000"
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &c[probe]["httpGet"];
        ensure!(get["path"] == path, "{probe} path: {get}");
        ensure!(get["port"] == "admin" || get["port"] == 15000, "{probe} port: {get}");
    }
    ensure!(c.get("startupProbe").is_none(), "unexpected startupProbe");
    Ok(())
}

#[test]
fn proxy_watches_the_api_for_its_own_node() -> Result<()> {
    let c = container()?;
    ensure!(
        c["image"] == IMAGE && c["imagePullPolicy"] == "IfNotPresent",
        "image: {} {}",
        c["image"],
        c["imagePullPolicy"]
    );
    let args = args()?;
    // The image's entrypoint is `outrigger`: the arguments start with the subcommand.
    ensure!(args.first().map(String::as_str) == Some("run"), "args start with `run`: {args:?}");
    ensure!(args.iter().any(|a| a == "--kubernetes"), "--kubernetes: {args:?}");
    ensure!(flag(&args, "--node-name").as_deref() == Some("$(NODE_NAME)"), "--node-name from NODE_NAME: {args:?}");
    let env = c["env"].as_array().context("env")?;
    let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").context("no NODE_NAME")?;
    ensure!(node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", "NODE_NAME: {node_name}");
    ensure!(pod_spec()?["serviceAccountName"] == NAME, "service account");
    ensure!(pod_spec()?["automountServiceAccountToken"] != false, "the token is the in-cluster credential");
    Ok(())
}

#[test]
fn host_mounts_match_the_flags_and_nothing_else_of_the_host_is_mounted() -> Result<()> {
    let args = args()?;
    let host_path = |v: &Value| str_of(&v["hostPath"]["path"]).to_owned();

    let host_proc = flag(&args, "--host-proc").context("--host-proc")?;
    let (mount, vol) = mount_at(&host_proc)?;
    ensure!(host_path(vol) == "/proc" && mount["readOnly"] == true, "host /proc read-only at {host_proc}");

    let cgroup = flag(&args, "--cgroup2-path").context("--cgroup2-path")?;
    let (mount, vol) = mount_at(&cgroup)?;
    ensure!(host_path(vol) == "/sys/fs/cgroup" && mount["readOnly"] == true, "the node's cgroup2 mount at {cgroup}");

    let textfile = flag(&args, "--textfile-dir").context("--textfile-dir")?;
    let (mount, vol) = mount_at(&textfile)?;
    ensure!(vol["hostPath"]["type"] == "DirectoryOrCreate", "textfile hostPath DirectoryOrCreate: {vol}");
    ensure!(!host_path(vol).is_empty() && mount["readOnly"] != true, "textfile directory writable: {mount}");

    let ca = flag(&args, "--ca-dir").context("--ca-dir")?;
    let (mount, vol) = mount_at(&ca)?;
    ensure!(vol["secret"]["secretName"] == "outrigger-ca" && mount["readOnly"] == true, "CA secret at {ca}: {vol}");
    ensure!(vol["secret"]["defaultMode"] == 0o400, "the CA key readable by its owner only: {vol}");

    // Least privilege: these three host paths and no other (no /, no
    // /var/run/netns — network namespaces are found through /proc — no
    // /sys/fs/bpf — nothing is pinned).
    let host_paths: BTreeSet<String> = pod_spec()?["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .filter(|v| v["hostPath"].is_object())
        .map(host_path)
        .collect();
    let expected: BTreeSet<String> = ["/proc", "/sys/fs/cgroup", "/var/lib/node_exporter/textfile_collector"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    ensure!(host_paths == expected, "hostPath volumes {host_paths:?}, expected {expected:?}");
    for mount in container()?["volumeMounts"].as_array().context("volumeMounts")? {
        volume(str_of(&mount["name"]))?;
        ensure!(mount["mountPropagation"].is_null(), "no mount propagation needed: {mount}");
    }
    Ok(())
}

#[test]
fn rbac_reads_exactly_the_watched_kinds_and_writes_only_events() -> Result<()> {
    let rendered = base();
    let role = rendered.get("ClusterRole", NAME)?;
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().context("rules")? {
        ensure!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null(), "unexpected rule {rule}");
        let verbs = strings(&rule["verbs"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                ensure!(group != "*" && resource != "*" && !verbs.iter().any(|v| v == "*"), "wildcard in {rule}");
                granted.entry((group.clone(), resource)).or_default().extend(verbs.iter().cloned());
            }
        }
    }
    ensure!(granted == expected_rbac(), "ClusterRole grants {granted:?}\nexpected {:?}", expected_rbac());
    let binding = rendered.get("ClusterRoleBinding", NAME)?;
    ensure!(binding["roleRef"]["kind"] == "ClusterRole" && binding["roleRef"]["name"] == NAME, "roleRef: {binding}");
    let subjects = binding["subjects"].as_array().context("subjects")?;
    ensure!(
        subjects.len() == 1
            && subjects[0]["kind"] == "ServiceAccount"
            && subjects[0]["name"] == NAME
            && subjects[0]["namespace"] == NAMESPACE,
        "subjects: {subjects:?}"
    );
    let roles = rendered.objects.iter().filter(|o| o["kind"] == "Role" || o["kind"] == "RoleBinding").count();
    ensure!(roles == 0, "no namespaced roles expected");
    Ok(())
}

#[test]
fn one_proxy_per_node_on_every_node() -> Result<()> {
    let ds = daemonset()?;
    let strategy = &ds["spec"]["updateStrategy"];
    ensure!(strategy["type"] == "RollingUpdate", "updateStrategy: {strategy}");
    // Two proxies on one node would both attach; 0% is 0 too, but say it plainly.
    ensure!(strategy["rollingUpdate"]["maxSurge"] == 0, "maxSurge 0: {strategy}");
    ensure!(strategy["rollingUpdate"]["maxUnavailable"] == 1, "maxUnavailable 1: {strategy}");
    let pod = pod_spec()?;
    ensure!(pod["priorityClassName"] == "system-node-critical", "priority class");
    let tolerations = pod["tolerations"].as_array().context("tolerations")?;
    ensure!(
        tolerations.iter().any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "tolerate every taint: {tolerations:?}"
    );
    let selector = ds["spec"]["selector"]["matchLabels"].as_object().context("selector")?;
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector {
        ensure!(&labels[k] == v, "the selector's {k} is not on the pod template");
    }
    ensure!(labels["outrigger.dev/mesh"] == "disabled", "the proxy opts out of the mesh");
    let drain = seconds(&flag(&args()?, "--drain-timeout").unwrap_or_else(|| "20s".into()))?;
    let grace = pod["terminationGracePeriodSeconds"].as_u64().context("terminationGracePeriodSeconds")?;
    ensure!(grace > drain && grace <= drain + 30, "grace period {grace}s: a little above --drain-timeout {drain}s");
    Ok(())
}

#[test]
fn resources_follow_the_measurements() -> Result<()> {
    let resources = &container()?["resources"];
    let request = bytes(str_of(&resources["requests"]["memory"]))?;
    let limit = bytes(str_of(&resources["limits"]["memory"]))?;
    // ~13 MB idle; ~84 MB of state at 10k services / 100k endpoints, plus connections.
    ensure!(request >= 16 << 20, "memory request {request} below the idle footprint");
    ensure!(
        limit >= 256 << 20 && limit >= 4 * request,
        "memory limit {limit} leaves no room for cluster state and connections"
    );
    ensure!(resources["requests"]["cpu"].is_string(), "a CPU request: {resources}");
    ensure!(
        resources["limits"]["cpu"].is_null(),
        "no CPU limit (throttling delays every meshed connection): {resources}"
    );
    Ok(())
}

/// podman, as root, on any host this project runs on: runc (crun refuses
/// hybrid cgroup hosts), the cgroupfs manager (no systemd needed), no
/// network (nothing to reach; no bridge or firewall rules made), limits at
/// or below any hard limit (podman's defaults need CAP_SYS_RESOURCE), and
/// never a pull.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--cgroup-manager", "cgroupfs"]);
    cmd
}

const PODMAN_RUN: &[&str] = &[
    "run",
    "--rm",
    "--pull",
    "never",
    "--runtime",
    "runc",
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

#[test]
fn image_runs_the_proxy() -> Result<()> {
    let Ok(image) = std::env::var("OUTRIGGER_IMAGE") else {
        eprintln!("skipped: OUTRIGGER_IMAGE is not set (`cargo xtask test` builds the image and sets it)");
        return Ok(());
    };
    ensure!(image == IMAGE, "the DaemonSet runs {IMAGE}, the image under test is {image}");

    let out = podman().args(PODMAN_RUN).arg(&image).arg("--version").output().context("running podman")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "podman run {image} --version failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("outrigger {}", env!("CARGO_PKG_VERSION"));
    ensure!(stdout.trim() == expected, "--version printed {stdout:?}, expected {expected:?}");

    let out = podman().args(["image", "inspect", "--format", "{{json .Config}}", &image]).output()?;
    ensure!(out.status.success(), "podman image inspect: {}", String::from_utf8_lossy(&out.stderr));
    let config: Value = serde_json::from_slice(&out.stdout).context("image config")?;
    ensure!(strings(&config["Entrypoint"]) == ["/usr/local/bin/outrigger"], "entrypoint: {config}");
    ensure!(strings(&config["Cmd"]) == ["run"], "default arguments: {config}");
    eprintln!("{image}: `{expected}`; entrypoint {}, cmd {}", config["Entrypoint"], config["Cmd"]);
    Ok(())
}
