//! `grpo-node launch --backend kubernetes`: every example manifest with a `[kubernetes]` table
//! renders objects that pass `kubernetes-validate --strict` (PyPI 1.37.0, the Kubernetes 1.32
//! schemas, offline) with no resource left unchecked (a kind without a schema only warns there:
//! here that fails), and our own lints (run by the renderer itself, and unit-tested to fire in
//! `src/launch/kubernetes.rs`).

mod common;

use std::process::Command;

#[test]
fn the_example_manifests_render_valid_kubernetes_objects() {
    let python = std::env::var("GRPO_PYTHON").expect("GRPO_PYTHON (source scripts/setup.sh)");
    let validate = std::path::Path::new(&python).with_file_name("kubernetes-validate");
    let mut rendered = 0;
    for entry in std::fs::read_dir(common::repo().join("cluster")).expect("cluster/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.extension().is_none_or(|e| e != "toml") || !text.contains("\n[kubernetes]") {
            continue;
        }
        let out = common::grpo_node()
            .args(["launch", "--backend", "kubernetes"])
            .arg(&path)
            .output()
            .expect("render");
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(yaml.path(), &out.stdout).expect("write");
        let checked = Command::new(&validate)
            .args(["--strict", "-k", "1.32.0"])
            .arg(yaml.path())
            .output()
            .expect("kubernetes-validate (python/requirements.txt)");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(checked.status.success(), "{}: {report}", path.display());
        let objects = String::from_utf8_lossy(&out.stdout).matches("\"apiVersion\"").count();
        assert_eq!(report.matches(" passed for resource ").count(), objects, "{report}");
        assert!(
            !report.contains("WARN") && !report.contains("Couldn't find schema"),
            "{report}"
        );
        rendered += 1;
    }
    assert!(rendered >= 1, "no example manifest has a [kubernetes] table");
}

/// Without a `[kubernetes]` table the backend says what it needs.
#[test]
fn a_manifest_without_a_kubernetes_table_is_refused() {
    let out = common::grpo_node()
        .args(["launch", "--backend", "kubernetes"])
        .arg(common::repo().join("cluster/local.toml"))
        .output()
        .expect("render");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a [kubernetes] table"));
}
