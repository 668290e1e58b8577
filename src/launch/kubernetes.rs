//! `grpo-node launch --backend kubernetes`: a manifest as Kubernetes objects, printed for
//! `kubectl apply -f -` (nothing is applied: no cluster is reachable from here to test that).
//!
//! Per group: a Job (one pod, `backoffLimit: 0`, `restartPolicy: Never`) running `grpo-node
//! launch-task` for the group, with its CPU request, GPU limit and a readiness probe on the
//! group's first HTTP readiness check, and a headless Service for a stable name and the ports
//! the group owns. Plus a ConfigMap holding the manifest. Every pod mounts the `[kubernetes]`
//! claim (ReadWriteMany) where the run directory lives, so the tasks meet through it as on
//! Slurm, and the manifest's secrets come from the Secret `grpo-<name>-secrets`, mounted as
//! files. Ports are fixed (`port_base` up). When a process dies its task fails its Job, and the
//! other groups see the run's end and stop: the run fails fast.
//!
//! [`lint`] checks what the API server would and `kubernetes-validate` does not: selectors
//! match pod labels, Service ports match container ports, probes point at a real readiness
//! endpoint on a container port, restart policies suit Jobs, names are DNS labels, and no
//! secret value appears in an object.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::manifest::{KubeSpec, Manifest, Process, Ready};
use super::runner::LaunchError;

const APP: &str = "grpo-node";

/// Renders the manifest at `path` (multi-document YAML: one JSON object per document).
pub fn render_file(path: &Path) -> Result<String, LaunchError> {
    let m = Manifest::read(path)?;
    let text = std::fs::read_to_string(path).map_err(super::runner::io(format!("reading {}", path.display())))?;
    let objects = render(&m, &text, &format!("{}-{}", m.name, super::runner::unix_seconds()))?;
    let problems = lint(&objects);
    if !problems.is_empty() {
        return Err(LaunchError::Backend(format!(
            "the rendered objects fail our lints: {}",
            problems.join("; ")
        )));
    }
    Ok(to_yaml(&objects, &m))
}

/// The objects as a YAML stream, with how to create the Secret first.
pub fn to_yaml(objects: &[Value], m: &Manifest) -> String {
    let mut out = format!(
        "# grpo-node launch --backend kubernetes: {} (manifest schema {}).\n",
        m.name, m.schema
    );
    if !m.secrets.is_empty() {
        let keys: Vec<String> = m
            .secrets
            .keys()
            .map(|k| format!("--from-literal={k}=$(openssl rand -hex 32)"))
            .collect();
        out.push_str(&format!(
            "# Create its Secret first: kubectl create secret generic {} {}\n",
            secret_name(m),
            keys.join(" ")
        ));
    }
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(o).unwrap_or_default());
        out.push('\n');
    }
    out
}

fn secret_name(m: &Manifest) -> String {
    format!("grpo-{}-secrets", m.name)
}

fn object_name(m: &Manifest, group: &str) -> String {
    format!("grpo-{}-{group}", m.name)
}

/// The fixed port of every `{port:NAME}`: port_base + its rank in sorted order.
pub fn fixed_ports(m: &Manifest, k: &KubeSpec) -> BTreeMap<String, u16> {
    m.port_owners()
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), k.port_base.saturating_add(i as u16)))
        .collect()
}

/// The objects for run `run_name` of `m` (`text` is the manifest file for the ConfigMap).
pub fn render(m: &Manifest, text: &str, run_name: &str) -> Result<Vec<Value>, LaunchError> {
    let k = m.kubernetes.as_ref().ok_or_else(|| {
        LaunchError::Backend(format!(
            "{}: --backend kubernetes needs a [kubernetes] table (image, claim)",
            m.name
        ))
    })?;
    let ports = fixed_ports(m, k);
    let owners = m.port_owners();
    let run = format!("{}/{run_name}", k.mount.trim_end_matches('/'));
    let mut meta =
        json!({"name": format!("grpo-{}", m.name), "labels": {"app.kubernetes.io/name": APP, "grpo.dev/run": m.name}});
    if let Some(ns) = &k.namespace {
        meta["namespace"] = json!(ns);
    }
    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"manifest.toml": text},
    })];
    for g in m.group_names() {
        let own: BTreeMap<&String, u16> = owners
            .iter()
            .filter(|(_, p)| m.process.iter().any(|q| &q.name == *p && m.group_of(q) == g))
            .filter_map(|(n, _)| ports.get(n).map(|p| (n, *p)))
            .collect();
        objects.push(service(m, k, &g, &own));
        objects.push(job(m, k, &g, &run, &ports, &own));
    }
    Ok(objects)
}

fn labels(m: &Manifest, group: &str) -> Value {
    json!({"app.kubernetes.io/name": APP, "grpo.dev/run": m.name, "grpo.dev/group": group})
}

fn metadata(m: &Manifest, k: &KubeSpec, group: &str) -> Value {
    let mut meta = json!({"name": object_name(m, group), "labels": labels(m, group)});
    if let Some(ns) = &k.namespace {
        meta["namespace"] = json!(ns);
    }
    meta
}

/// A Kubernetes port name (at most 15 characters, lower-case letters, digits and `-`).
fn port_name(n: &str) -> Option<String> {
    let ok = n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then(|| n.to_string())
}

fn service(m: &Manifest, k: &KubeSpec, group: &str, own: &BTreeMap<&String, u16>) -> Value {
    let ports: Vec<Value> = own
        .iter()
        .map(|(n, p)| {
            let mut v = json!({"port": p, "targetPort": p, "protocol": "TCP"});
            if let Some(name) = port_name(n) {
                v["name"] = json!(name);
            }
            v
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(m, k, group),
        "spec": {"clusterIP": "None", "selector": labels(m, group), "ports": ports},
    })
}

/// The group's first HTTP readiness check as (path, port name): the pod's readiness probe.
fn probe_of<'a>(m: &'a Manifest, group: &str) -> Option<(String, String)> {
    m.process
        .iter()
        .filter(|p| m.group_of(p) == group)
        .find_map(|p: &'a Process| match &p.ready {
            Some(Ready::Http(url)) => http_path_and_port(url),
            _ => None,
        })
}

/// `http://{host:G}:{port:NAME}/path` as ("/path", NAME).
fn http_path_and_port(url: &str) -> Option<(String, String)> {
    let rest = url.split_once("://")?.1;
    let port = rest.split("{port:").nth(1)?.split('}').next()?.to_string();
    let after = rest.split_once("{port:")?.1.split_once('}')?.1;
    let path = if after.is_empty() {
        "/".to_string()
    } else {
        after.to_string()
    };
    Some((path, port))
}

fn job(
    m: &Manifest,
    k: &KubeSpec,
    group: &str,
    run: &str,
    ports: &BTreeMap<String, u16>,
    own: &BTreeMap<&String, u16>,
) -> Value {
    let spec = m.group_spec(group);
    let fixed: Vec<String> = ports.iter().map(|(n, p)| format!("{n}={p}")).collect();
    let command = json!([
        "grpo-node",
        "launch-task",
        "--run",
        run,
        "--repo",
        k.repo,
        "--group",
        group,
        "--address",
        "$(POD_IP)",
        "--ports",
        fixed.join(","),
        "/etc/grpo/manifest.toml"
    ]);
    let container_ports: Vec<Value> = own
        .values()
        .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    let mut resources = json!({"requests": {"cpu": spec.cpus.to_string()}});
    if spec.gpus > 0 {
        resources["limits"] = json!({"nvidia.com/gpu": spec.gpus.to_string()});
    }
    let mut container = json!({
        "name": group, "image": k.image, "command": command,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GRPO_PYTHON", "value": k.python},
        ],
        "ports": container_ports, "resources": resources,
        "volumeMounts": [
            {"name": "runs", "mountPath": k.mount},
            {"name": "manifest", "mountPath": "/etc/grpo", "readOnly": true},
        ],
    });
    if let Some((path, name)) = probe_of(m, group) {
        if let Some(port) = ports.get(&name) {
            container["readinessProbe"] =
                json!({"httpGet": {"path": path, "port": port}, "periodSeconds": 2, "failureThreshold": 3});
        }
    }
    let mut volumes = vec![
        json!({"name": "runs", "persistentVolumeClaim": {"claimName": k.claim}}),
        json!({"name": "manifest", "configMap": {"name": format!("grpo-{}", m.name)}}),
    ];
    if !m.secrets.is_empty() {
        volumes.push(json!({"name": "secrets", "secret": {"secretName": secret_name(m), "defaultMode": 0o400}}));
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            mounts.push(json!({"name": "secrets", "mountPath": format!("{run}/secrets"), "readOnly": true}));
        }
    }
    json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(m, k, group),
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels(m, group)},
                "spec": {
                    "restartPolicy": "Never", "hostname": group, "subdomain": object_name(m, group),
                    "containers": [container], "volumes": volumes,
                },
            },
        },
    })
}

/// Our own checks of rendered objects; empty when all pass.
pub fn lint(objects: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let pods: Vec<&Value> = objects.iter().filter_map(|o| o.pointer("/spec/template")).collect();
    for o in objects {
        let name = o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        let dns = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !dns {
            out.push(format!("{name:?} is not a DNS label of at most 63 characters"));
        }
        match o["kind"].as_str() {
            Some("Service") => lint_service(o, name, &pods, &mut out),
            Some("Job") => lint_job(o, name, &mut out),
            _ => {}
        }
    }
    out
}

fn matches(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn container_ports(pod: &Value) -> Vec<u64> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect()
}

fn lint_service(o: &Value, name: &str, pods: &[&Value], out: &mut Vec<String>) {
    let selector = &o["spec"]["selector"];
    let selected: Vec<&&Value> = pods
        .iter()
        .filter(|p| matches(selector, &p["metadata"]["labels"]))
        .collect();
    if selected.is_empty() {
        out.push(format!("Service {name}: its selector matches no pod template"));
    }
    let open: Vec<u64> = selected.iter().flat_map(|p| container_ports(p)).collect();
    for p in o["spec"]["ports"].as_array().into_iter().flatten() {
        let target = p["targetPort"].as_u64().unwrap_or(0);
        if !open.contains(&target) {
            out.push(format!(
                "Service {name}: port {target} is no container port of its pods"
            ));
        }
    }
}

fn lint_job(o: &Value, name: &str, out: &mut Vec<String>) {
    let pod = &o["spec"]["template"];
    let policy = pod["spec"]["restartPolicy"].as_str().unwrap_or("");
    if !matches!(policy, "Never" | "OnFailure") {
        out.push(format!(
            "Job {name}: restartPolicy {policy:?} (a Job's is Never or OnFailure)"
        ));
    }
    let open = container_ports(pod);
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(port) = c.pointer("/readinessProbe/httpGet/port").and_then(Value::as_u64) {
            if !open.contains(&port) {
                out.push(format!(
                    "Job {name}: the readiness probe's port {port} is no container port"
                ));
            }
        }
        let text = c.to_string().to_lowercase();
        if text.contains("--auth-token\"") || text.contains("--auth-token=") {
            out.push(format!(
                "Job {name}: a token on the command line (use {{secret:NAME}}, a Secret file)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_node() -> (Manifest, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/two-node.toml");
        let text = std::fs::read_to_string(&path).expect("cluster/two-node.toml");
        (Manifest::from_toml_str(&text, &path).expect("manifest"), text)
    }

    #[test]
    fn the_example_renders_clean_and_each_lint_fires() {
        let (m, text) = two_node();
        let objects = render(&m, &text, "two-node-1").expect("render");
        assert_eq!(objects.len(), 5, "a ConfigMap, then a Service and a Job per group");
        assert_eq!(lint(&objects), Vec::<String>::new());
        let probe = objects[4].pointer("/spec/template/spec/containers/0/readinessProbe/httpGet/path");
        assert_eq!(
            probe,
            Some(&json!("/health")),
            "the sidecar's pod is ready when its engine is"
        );
        let mut bad = objects.clone();
        bad[1]["spec"]["selector"]["grpo.dev/group"] = json!("nope");
        assert!(lint(&bad).iter().any(|p| p.contains("matches no pod")));
        let mut bad = objects.clone();
        bad[3]["spec"]["ports"][0]["targetPort"] = json!(1);
        assert!(lint(&bad).iter().any(|p| p.contains("no container port of its pods")));
        let mut bad = objects.clone();
        bad[2]["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
        assert!(lint(&bad).iter().any(|p| p.contains("restartPolicy")));
        let mut bad = objects.clone();
        bad[4]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!(2);
        assert!(lint(&bad).iter().any(|p| p.contains("readiness probe")));
        let mut bad = objects.clone();
        bad[2]["metadata"]["name"] = json!("Bad_Name");
        assert!(lint(&bad).iter().any(|p| p.contains("DNS label")));
        let mut bad = objects;
        bad[2]["spec"]["template"]["spec"]["containers"][0]["command"] = json!(["grpo-node", "--auth-token", "x"]);
        assert!(lint(&bad).iter().any(|p| p.contains("token on the command line")));
    }

    #[test]
    fn probes_come_from_readiness_urls() {
        assert_eq!(
            http_path_and_port("http://{host:inference}:{port:engine}/health"),
            Some(("/health".into(), "engine".into()))
        );
        assert_eq!(
            http_path_and_port("http://{host:head}:{port:api}"),
            Some(("/".into(), "api".into()))
        );
        assert_eq!(http_path_and_port("http://127.0.0.1:8000/"), None);
    }
}
