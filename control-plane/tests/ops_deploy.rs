#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The deployment files of `ops/` checked as the tools that read them would, offline:
//!
//! * the images: `scripts/images names` (what `scripts/images` builds from
//!   `ops/images/*.Containerfile`) names the agent image the control plane's install commands
//!   name, and the images the compose file and the Kubernetes manifests run;
//! * Kubernetes: `kubectl kustomize ops/kubernetes` renders, and the objects are a working
//!   cluster: the control plane's replicas (>= 2) with readiness on `/readyz` and liveness on
//!   `/healthz` of the metrics port its `EDGEPLANE_METRICS_ADDR` opens, the gateways' Service
//!   on 8000 and the API's on 9443 selecting the right pods and ports, Redis with AOF on a
//!   claimed volume, PodDisruptionBudgets, resources and an unprivileged, read-only
//!   `securityContext` on every container, every Secret, key and ConfigMap referenced
//!   rendered, every `EDGEPLANE_*` variable one the binary reads (its `--help`); the
//!   production overlay, with secrets from `ops/generate-secrets`, replaces the placeholder
//!   Secrets with the real certificate and key;
//! * compose: the compose tool's `config` (Debian's `docker-compose`) accepts
//!   `ops/compose/compose.yaml`, and its resolved form has the two replicas, two gateways,
//!   Redis with AOF, Prometheus and Grafana wired as above; `ops/compose/prometheus.yml`
//!   keeps `ops/prometheus/prometheus.yml`'s jobs with the compose targets, and
//!   `promtool check config` accepts it;
//! * no private key is committed under `ops/`.
//!
//! `kubectl` (this machine kind's image has it), `docker-compose` and `promtool` (Debian's
//! `docker-compose` and `prometheus` packages, which `scripts/test` installs) and `openssl`
//! must be installed: without one of them these tests fail, saying so; they never pass
//! silently. The images themselves are built and run by `scripts/images run-check` (Podman,
//! minutes of work; not part of this suite). Run alone:
//! `cargo test -p control-plane --test ops_deploy`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use serde::Deserialize as _;
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Runs `program args` in `dir`; a missing program fails the test with `install`.
fn run(program: &str, args: &[&str], dir: &Path, install: &str) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed (not found on PATH); {install}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// `run`, and its stdout; a failure shows the command and what it said.
fn run_ok(program: &str, args: &[&str], dir: &Path, install: &str) -> String {
    let out = run(program, args, dir, install);
    assert!(
        out.status.success(),
        "`{program} {}` in {} failed ({}):\n{}\n{}",
        args.join(" "),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

const KUBECTL: &str =
    "the Kubernetes checks need kubectl with kustomize v4 or later (this machine \
     kind's image has it; elsewhere install it from Kubernetes' own packages: Debian 12's \
     kubernetes-client 1.20 is too old for directories in `resources`)";
const COMPOSE: &str = "the compose checks need Debian's `docker-compose` package \
     (`apt-get install -y docker-compose`; scripts/test installs it)";
const PROMTOOL: &str = "install Debian's `prometheus` package (`apt-get install -y prometheus`; \
     scripts/test installs it)";
const OPENSSL: &str = "ops/generate-secrets needs openssl (`apt-get install -y openssl`)";

/// Every document of a YAML stream.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

/// A copy of `ops/` in a fresh directory (its compose and Kubernetes files refer to each other
/// by relative paths), for secrets made by `ops/generate-secrets`: the tests never write into
/// the source tree, where an operator's real secrets may live.
fn ops_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let out = Command::new("cp")
        .arg("-r")
        .arg(root().join("ops"))
        .arg(tmp.path())
        .output()
        .expect("cp");
    assert!(out.status.success(), "cp -r ops: {out:?}");
    // An operator's secrets in the source tree are not the test's.
    for dir in ["ops/compose/secrets", "ops/kubernetes/production/secrets"] {
        let _ = std::fs::remove_dir_all(tmp.path().join(dir));
    }
    tmp
}

/// `ops/generate-secrets dir names...`.
fn generate_secrets(ops: &Path, dir: &str, names: &[&str]) {
    let script = root().join("ops/generate-secrets");
    let mut args = vec![dir];
    args.extend_from_slice(names);
    let out = run(script.to_str().unwrap(), &args, ops, OPENSSL);
    assert!(
        out.status.success(),
        "ops/generate-secrets {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The images `scripts/images` builds: control plane, gateway, agent.
fn image_names() -> [String; 3] {
    let out = run_ok(
        root().join("scripts/images").to_str().unwrap(),
        &["names"],
        &root(),
        "",
    );
    let names: Vec<String> = out.lines().map(str::to_owned).collect();
    names
        .try_into()
        .unwrap_or_else(|n| panic!("scripts/images names: {n:?}"))
}

/// The `EDGEPLANE_*` variables a binary reads as flags (`[env: NAME=...]` in `--help`).
fn env_flags(binary: &Path) -> BTreeSet<String> {
    let out = run_ok(binary.to_str().unwrap(), &["--help"], &root(), "");
    let mut vars: BTreeSet<String> = out
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    // CONTRACT.md: read from the environment only, never a flag.
    vars.insert("EDGEPLANE_ADMIN_API_KEY".into());
    vars
}

fn control_plane_env() -> BTreeSet<String> {
    env_flags(Path::new(env!("CARGO_BIN_EXE_control-plane")))
}

fn gateway_env() -> BTreeSet<String> {
    env_flags(&testkit::process::bin("tunnel-gateway"))
}

/// The port of `HOST:PORT`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

// ------------------------------------------------------------------------------------------
// images

#[test]
fn images_are_the_ones_the_install_commands_and_deployments_name() {
    let [cp, gw, agent] = image_names();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(cp, format!("docker.io/edgeplane/control-plane:{version}"));
    assert_eq!(gw, format!("docker.io/edgeplane/tunnel-gateway:{version}"));
    // `edgeplane/edge-agent:<v>` is docker.io/edgeplane/edge-agent:<v> to Docker and Podman.
    let installed = control_plane::config::Config::new(PathBuf::from("data")).agent_image;
    assert_eq!(
        agent,
        format!("docker.io/{installed}"),
        "the install commands name {installed}; scripts/images must build that image"
    );

    for (binary, root_user) in [
        ("control-plane", false),
        ("tunnel-gateway", false),
        ("edge-agent", true),
    ] {
        let path = root().join(format!("ops/images/{binary}.Containerfile"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        assert!(
            has(&format!("COPY bin/{binary} /usr/local/bin/{binary}")),
            "{binary}: copies the staged binary"
        );
        assert!(
            has(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
            "{binary}: entrypoint"
        );
        assert!(
            has("ARG BASE=docker.io/library/debian:bookworm-slim"),
            "{binary}: the bookworm base the binaries' glibc matches"
        );
        assert!(
            !has("RUN "),
            "{binary}: no RUN step (any glibc base serves)"
        );
        assert!(
            has("LABEL org.opencontainers.image.title="),
            "{binary}: OCI labels"
        );
        assert_eq!(
            has("USER 65532:65532"),
            !root_user,
            "{binary}: unprivileged unless it needs the engine's socket (the agent)"
        );
    }
    let ignore = std::fs::read_to_string(root().join("ops/images/.containerignore")).unwrap();
    for binary in ["control-plane", "tunnel-gateway", "edge-agent"] {
        assert!(
            ignore.contains(&format!("!bin/{binary}")),
            "{binary} in the context"
        );
    }
}

#[test]
fn no_private_key_is_committed_under_ops() {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            // Where operators' secrets and staged binaries go: ignored by git.
            if path.is_dir() {
                if !matches!(name.to_str(), Some("secrets" | "bin" | "data")) {
                    walk(&path, found);
                }
            } else if std::fs::read(&path)
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("PRIVATE KEY-----"))
            {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&root().join("ops"), &mut found);
    assert!(found.is_empty(), "private keys under ops/: {found:?}");
}

// ------------------------------------------------------------------------------------------
// Kubernetes

/// `kubectl kustomize dir`, as objects.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = run_ok(
        "kubectl",
        &["kustomize", dir.to_str().unwrap()],
        &root(),
        KUBECTL,
    );
    yaml_docs(&out)
}

/// The rendered objects by kind and name.
struct Rendered(Vec<Value>);

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|o| str_of(&o["kind"]) == kind)
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|o| str_of(&o["kind"]) == kind && str_of(&o["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
    }

    /// The one object of `kind` whose name starts with `prefix` (generated names end in a
    /// hash).
    fn generated(&self, kind: &str, prefix: &str) -> &Value {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .into_iter()
            .filter(|o| str_of(&o["metadata"]["name"]).starts_with(prefix))
            .collect();
        assert_eq!(found.len(), 1, "one {kind} {prefix}*: {found:?}");
        found[0]
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_mapping().expect("a selector");
    !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v)
}

/// The value of env var `name` of `container` (a literal value).
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    seq(&container["env"])
        .iter()
        .find(|e| str_of(&e["name"]) == name)
        .and_then(|e| e["value"].as_str())
}

/// The containerPort a probe's or Service's port (name or number) means in `container`.
fn container_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port);
    seq(&container["ports"])
        .iter()
        .find(|p| str_of(&p["name"]) == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port named {name:?} in {container:?}"))
}

/// The checks that hold for the base and for the overlay.
fn check_cluster(r: &Rendered, images: &[String; 3]) {
    let kinds: BTreeSet<&str> = r.0.iter().map(|o| str_of(&o["kind"])).collect();
    for kind in [
        "Namespace",
        "Deployment",
        "StatefulSet",
        "Service",
        "Secret",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(kind), "no {kind} rendered: {kinds:?}");
    }
    for o in &r.0 {
        let kind = str_of(&o["kind"]);
        if kind != "Namespace" {
            assert_eq!(
                str_of(&o["metadata"]["namespace"]),
                "edgeplane",
                "{kind} {:?} in the edgeplane namespace",
                o["metadata"]["name"]
            );
        }
    }
    let cp_env = control_plane_env();
    let gw_env = gateway_env();

    // The control plane.
    let cp = r.get("Deployment", "edgeplane-control-plane");
    let replicas = cp["spec"]["replicas"].as_u64().unwrap_or(1);
    assert!(replicas >= 2, "control-plane replicas: {replicas}");
    let cp_pod = &cp["spec"]["template"];
    let cp_c = &seq(&cp_pod["spec"]["containers"])[0];
    assert_eq!(str_of(&cp_c["image"]), images[0]);
    let metrics = port_of(env_value(cp_c, "EDGEPLANE_METRICS_ADDR").expect("metrics addr"));
    let ready = &cp_c["readinessProbe"]["httpGet"];
    assert_eq!(str_of(&ready["path"]), "/readyz");
    assert_eq!(
        container_port(cp_c, &ready["port"]),
        metrics,
        "readiness on the metrics port"
    );
    let live = &cp_c["livenessProbe"]["httpGet"];
    assert_eq!(str_of(&live["path"]), "/healthz");
    assert_eq!(
        container_port(cp_c, &live["port"]),
        metrics,
        "liveness on the metrics port"
    );
    assert_eq!(
        cp_pod["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some(metrics.to_string().as_str()),
        "scraped on the metrics port"
    );
    assert_eq!(
        env_value(cp_c, "EDGEPLANE_NO_EMBEDDED_GATEWAY"),
        Some("true")
    );
    let api = port_of(env_value(cp_c, "EDGEPLANE_API_ADDR").unwrap_or("0.0.0.0:9443"));

    // Redis: the URL names its Service, which selects the StatefulSet's pods, on AOF.
    let redis_url = env_value(cp_c, "EDGEPLANE_REDIS_URL").expect("cluster mode: a Redis URL");
    let redis_host = redis_url
        .trim_start_matches("redis://")
        .split([':', '/'])
        .next()
        .unwrap();
    let redis_svc = r.get("Service", redis_host);
    let redis = r.get("StatefulSet", "edgeplane-redis");
    assert!(labels_match(
        &redis_svc["spec"]["selector"],
        &redis["spec"]["template"]["metadata"]["labels"]
    ));
    assert!(seq(&redis_svc["spec"]["ports"])
        .iter()
        .any(|p| p["port"].as_u64() == Some(port_of(redis_url))));
    let redis_c = &seq(&redis["spec"]["template"]["spec"]["containers"])[0];
    let args: Vec<&str> = seq(&redis_c["args"]).iter().map(str_of).collect();
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "Redis with AOF: {args:?}"
    );
    let dir = args
        .windows(2)
        .find(|w| w[0] == "--dir")
        .map(|w| w[1])
        .expect("--dir");
    let claim = &seq(&redis["spec"]["volumeClaimTemplates"])[0];
    let claim_name = str_of(&claim["metadata"]["name"]);
    assert!(
        seq(&redis_c["volumeMounts"])
            .iter()
            .any(|m| str_of(&m["name"]) == claim_name && str_of(&m["mountPath"]) == dir),
        "the AOF dir {dir} on the claimed volume"
    );

    // The API Service: 9443 to the replicas' API port.
    let api_svc = r.get("Service", "edgeplane-api");
    assert!(labels_match(
        &api_svc["spec"]["selector"],
        &cp_pod["metadata"]["labels"]
    ));
    let p = seq(&api_svc["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_u64() == Some(9443))
        .expect("the API Service on 9443");
    assert_eq!(container_port(cp_c, &p["targetPort"]), api);

    // The gateways and their Service on 8000.
    let gw = r.get("Deployment", "edgeplane-tunnel-gateway");
    assert!(
        gw["spec"]["replicas"].as_u64().unwrap_or(1) >= 2,
        "gateway replicas"
    );
    let gw_pod = &gw["spec"]["template"];
    let gw_c = &seq(&gw_pod["spec"]["containers"])[0];
    assert_eq!(str_of(&gw_c["image"]), images[1]);
    let gw_metrics = port_of(env_value(gw_c, "EDGEPLANE_METRICS_ADDR").expect("metrics addr"));
    assert_eq!(
        str_of(&gw_c["readinessProbe"]["httpGet"]["path"]),
        "/readyz"
    );
    assert_eq!(
        container_port(gw_c, &gw_c["readinessProbe"]["httpGet"]["port"]),
        gw_metrics
    );
    assert_eq!(
        str_of(&gw_c["livenessProbe"]["httpGet"]["path"]),
        "/healthz"
    );
    let listen = port_of(env_value(gw_c, "EDGEPLANE_LISTEN").unwrap_or("0.0.0.0:8000"));
    let tunnel_svc = r.get("Service", "edgeplane-tunnel");
    assert!(labels_match(
        &tunnel_svc["spec"]["selector"],
        &gw_pod["metadata"]["labels"]
    ));
    let p = seq(&tunnel_svc["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_u64() == Some(8000))
        .expect("the gateways' Service on 8000");
    assert_eq!(container_port(gw_c, &p["targetPort"]), listen);
    assert_eq!(
        env_value(gw_c, "EDGEPLANE_REDIS_URL"),
        Some(redis_url),
        "gateways share the replicas' Redis"
    );

    // PodDisruptionBudgets: one for the replicas, one for the gateways, each leaving room
    // for a voluntary eviction.
    for (deploy, pod) in [(cp, cp_pod), (gw, gw_pod)] {
        let pdb = r
            .of_kind("PodDisruptionBudget")
            .into_iter()
            .find(|p| {
                labels_match(
                    &p["spec"]["selector"]["matchLabels"],
                    &pod["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| {
                panic!(
                    "no PodDisruptionBudget for {:?}",
                    deploy["metadata"]["name"]
                )
            });
        let min = pdb["spec"]["minAvailable"].as_u64().expect("minAvailable");
        let replicas = deploy["spec"]["replicas"].as_u64().unwrap();
        assert!(
            min >= 1 && min < replicas,
            "minAvailable {min} of {replicas}"
        );
    }

    // Every workload: resources, unprivileged, read-only root; every variable known.
    for (kind, name) in [
        ("Deployment", "edgeplane-control-plane"),
        ("Deployment", "edgeplane-tunnel-gateway"),
        ("StatefulSet", "edgeplane-redis"),
    ] {
        let spec = &r.get(kind, name)["spec"]["template"]["spec"];
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}: runAsNonRoot"
        );
        for c in seq(&spec["containers"]) {
            for what in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    assert!(
                        !c["resources"][what][res].is_null(),
                        "{name}: resources.{what}.{res}"
                    );
                }
            }
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
            assert_eq!(
                sc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{name}"
            );
            assert!(
                seq(&sc["capabilities"]["drop"]).iter().any(|d| d == "ALL"),
                "{name}: drops all capabilities"
            );
            let known = match name {
                "edgeplane-control-plane" => Some(&cp_env),
                "edgeplane-tunnel-gateway" => Some(&gw_env),
                _ => None,
            };
            for e in seq(&c["env"]) {
                let var = str_of(&e["name"]);
                if let (Some(known), true) = (known, var.starts_with("EDGEPLANE_")) {
                    assert!(known.contains(var), "{name}: {var} is no variable it reads");
                }
            }
        }
    }

    // Every Secret and ConfigMap (and key) referenced is rendered.
    for (kind, name) in [
        ("Deployment", "edgeplane-control-plane"),
        ("Deployment", "edgeplane-tunnel-gateway"),
    ] {
        let spec = &r.get(kind, name)["spec"]["template"]["spec"];
        let mut refs: Vec<(&str, &str, Option<&str>)> = Vec::new();
        for v in seq(&spec["volumes"]) {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                refs.push(("Secret", s, None));
            }
        }
        for c in seq(&spec["containers"]) {
            for e in seq(&c["env"]) {
                let from = &e["valueFrom"];
                if let Some(s) = from["secretKeyRef"]["name"].as_str() {
                    refs.push(("Secret", s, from["secretKeyRef"]["key"].as_str()));
                }
                if let Some(m) = from["configMapKeyRef"]["name"].as_str() {
                    refs.push(("ConfigMap", m, from["configMapKeyRef"]["key"].as_str()));
                }
            }
        }
        for (kind, object, key) in refs {
            let o = r.get(kind, object);
            if let Some(key) = key {
                assert!(
                    !o["data"][key].is_null(),
                    "{name}: {kind} {object} has no key {key}"
                );
            }
        }
    }
    let admin = r.generated("Secret", "edgeplane-admin-");
    let admin_ref = seq(&cp_c["env"])
        .iter()
        .find(|e| str_of(&e["name"]) == "EDGEPLANE_ADMIN_API_KEY")
        .map(|e| &e["valueFrom"]["secretKeyRef"])
        .expect("the admin key from a Secret");
    assert_eq!(admin_ref["name"], admin["metadata"]["name"]);
    let tls = r.generated("Secret", "edgeplane-tls-");
    assert_eq!(str_of(&tls["type"]), "kubernetes.io/tls");
    for key in ["tls.crt", "tls.key"] {
        assert!(!tls["data"][key].is_null(), "edgeplane-tls has {key}");
    }
    for path in ["EDGEPLANE_TLS_CERT", "EDGEPLANE_TLS_KEY"] {
        for c in [cp_c, gw_c] {
            let file = env_value(c, path).expect("TLS from files");
            let dir = Path::new(file).parent().unwrap();
            let mount = seq(&c["volumeMounts"])
                .iter()
                .find(|m| Path::new(str_of(&m["mountPath"])) == dir)
                .unwrap_or_else(|| panic!("{path}={file}: nothing mounted at {}", dir.display()));
            let pod = if std::ptr::eq(c, cp_c) {
                cp_pod
            } else {
                gw_pod
            };
            let volume = seq(&pod["spec"]["volumes"])
                .iter()
                .find(|v| v["name"] == mount["name"])
                .expect("the mounted volume");
            assert_eq!(
                volume["secret"]["secretName"], tls["metadata"]["name"],
                "{path} comes from the TLS Secret"
            );
        }
    }
}

fn decoded(secret: &Value, key: &str) -> String {
    let b64 = str_of(&secret["data"][key]).replace('\n', "");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64 data"),
    )
    .expect("UTF-8 secret")
}

#[test]
fn kustomize_renders_the_cluster_with_placeholder_secrets() {
    let images = image_names();
    let r = Rendered(kustomize(&root().join("ops/kubernetes")));
    check_cluster(&r, &images);
    // The placeholders can serve nothing: no certificate, no key, an empty admin key (the
    // control plane refuses the certificate at start).
    let tls = r.generated("Secret", "edgeplane-tls-");
    assert!(!decoded(tls, "tls.crt").contains("-----BEGIN"));
    assert!(!decoded(tls, "tls.key").contains("-----BEGIN"));
    let admin = r.generated("Secret", "edgeplane-admin-");
    assert_eq!(decoded(admin, "admin-api-key"), "");
}

#[test]
fn kustomize_production_overlay_brings_generated_secrets() {
    let images = image_names();
    let tmp = ops_copy();
    let ops = tmp.path().join("ops");
    generate_secrets(
        &ops,
        "kubernetes/production/secrets",
        &["edgeplane.example.com"],
    );
    let r = Rendered(kustomize(&ops.join("kubernetes/production")));
    check_cluster(&r, &images);
    assert_eq!(r.of_kind("Secret").len(), 2, "replaced, not added");
    let tls = r.generated("Secret", "edgeplane-tls-");
    assert!(decoded(tls, "tls.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(decoded(tls, "tls.key").contains("PRIVATE KEY-----"));
    let admin = r.generated("Secret", "edgeplane-admin-");
    let key = decoded(admin, "admin-api-key");
    let written =
        std::fs::read_to_string(ops.join("kubernetes/production/secrets/admin-api-key")).unwrap();
    assert_eq!(key, written);
    assert!(
        key.starts_with("ep_") && key.len() > 40 && key.trim() == key,
        "an admin key without whitespace (it becomes EDGEPLANE_ADMIN_API_KEY as it is): {key:?}"
    );
    let config = r.generated("ConfigMap", "edgeplane-config-");
    assert_eq!(
        str_of(&config["data"]["public-url"]),
        "https://edgeplane.example.com:9443"
    );
    assert!(!config["data"]["tunnel-public-addr"].is_null());
}

// ------------------------------------------------------------------------------------------
// compose

/// `docker-compose -f compose.yaml config` on a copy of `ops/` with generated secrets, as
/// YAML.
fn compose_config() -> (Value, tempfile::TempDir) {
    let tmp = ops_copy();
    let ops = tmp.path().join("ops");
    generate_secrets(&ops, "compose/secrets", &[]);
    let compose = ops.join("compose");
    let out = run(
        "docker-compose",
        &[
            "--project-name",
            "edgeplane",
            "-f",
            "compose.yaml",
            "config",
        ],
        &compose,
        COMPOSE,
    );
    assert!(
        out.status.success(),
        "docker-compose config rejects ops/compose/compose.yaml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    (serde_yaml::from_str(&text).expect("config's YAML"), tmp)
}

/// A service's environment as a map (compose prints it as a mapping).
fn environment(service: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match &service["environment"] {
        Value::Mapping(m) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
                };
                env.insert(str_of(k).to_owned(), v);
            }
        }
        Value::Sequence(s) => {
            for kv in s {
                let (k, v) = str_of(kv).split_once('=').unwrap_or((str_of(kv), ""));
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        _ => {}
    }
    env
}

/// A service's mounts as (source, target), in either syntax compose prints.
fn mounts(service: &Value) -> Vec<(String, String)> {
    seq(&service["volumes"])
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => {
                let mut parts = s.split(':');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            }
            m => Some((
                str_of(&m["source"]).to_owned(),
                str_of(&m["target"]).to_owned(),
            )),
        })
        .collect()
}

/// Where a service mounts a volume or bind source ending in `source_end`, if it does.
fn mount_of(service: &Value, source_end: &str) -> Option<String> {
    mounts(service)
        .into_iter()
        .find(|(src, _)| src.ends_with(source_end))
        .map(|(_, dst)| dst)
}

/// The host ports a service publishes, in either syntax compose prints.
fn published(service: &Value) -> Vec<u64> {
    seq(&service["ports"])
        .iter()
        .filter_map(|p| match p {
            Value::String(s) => {
                let s = s.split('/').next()?;
                let parts: Vec<&str> = s.split(':').collect();
                (parts.len() >= 2).then(|| parts[parts.len() - 2].parse().ok())?
            }
            m => m["published"]
                .as_u64()
                .or_else(|| str_of(&m["published"]).parse().ok()),
        })
        .collect()
}

#[test]
fn compose_config_accepts_the_cluster() {
    let [cp_image, gw_image, _] = image_names();
    let (config, tmp) = compose_config();
    let secrets_dir = tmp.path().join("ops/compose/secrets");
    let services = config["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().map(str_of).collect();
    let expected: BTreeSet<&str> = [
        "redis",
        "control-plane-1",
        "control-plane-2",
        "api",
        "tunnel-gateway-1",
        "tunnel-gateway-2",
        "prometheus",
        "grafana",
    ]
    .into();
    assert_eq!(names, expected);
    let service = |name: &str| &config["services"][name];
    let cp_env = control_plane_env();
    let gw_env = gateway_env();

    // Redis with AOF on a volume.
    let redis = service("redis");
    let command: Vec<&str> = seq(&redis["command"]).iter().map(str_of).collect();
    assert!(
        command.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "Redis with AOF: {command:?}"
    );
    assert_eq!(mount_of(redis, "redis-data").as_deref(), Some("/data"));

    // Two replicas on that Redis, no embedded gateway, the same certificate and admin key.
    let admin_key = std::fs::read_to_string(secrets_dir.join("admin-api-key")).unwrap();
    let mut data_volumes = BTreeSet::new();
    for name in ["control-plane-1", "control-plane-2"] {
        let cp = service(name);
        assert_eq!(str_of(&cp["image"]), cp_image, "{name}");
        let env = environment(cp);
        for var in env.keys().filter(|k| k.starts_with("EDGEPLANE_")) {
            assert!(
                cp_env.contains(var),
                "{name}: {var} is no variable it reads"
            );
        }
        assert_eq!(env["EDGEPLANE_REDIS_URL"], "redis://redis:6379");
        assert_eq!(env["EDGEPLANE_NO_EMBEDDED_GATEWAY"], "true");
        assert_eq!(
            env["EDGEPLANE_ADMIN_API_KEY"], admin_key,
            "{name}: admin.env"
        );
        assert_eq!(port_of(&env["EDGEPLANE_METRICS_ADDR"]), 9444);
        assert!(env["EDGEPLANE_PUBLIC_URL"].starts_with("https://"));
        let targets: BTreeSet<&str> = seq(&cp["secrets"])
            .iter()
            .map(|s| str_of(&s["target"]))
            .collect();
        assert_eq!(
            targets,
            ["tls.crt", "tls.key"].into(),
            "{name}: TLS secrets"
        );
        assert_eq!(env["EDGEPLANE_TLS_CERT"], "/run/secrets/tls.crt");
        assert_eq!(env["EDGEPLANE_TLS_KEY"], "/run/secrets/tls.key");
        assert_eq!(
            cp["read_only"].as_bool(),
            Some(true),
            "{name}: read-only root"
        );
        let data = mounts(cp)
            .into_iter()
            .find(|(_, dst)| dst == "/data")
            .unwrap_or_else(|| panic!("{name}: a volume on /data"));
        data_volumes.insert(data.0);
    }
    assert_eq!(
        data_volumes.len(),
        2,
        "a data volume each: {data_volumes:?}"
    );

    // Two gateways, each reachable by agents at its own address, dialled by name.
    let mut public = BTreeSet::new();
    for name in ["tunnel-gateway-1", "tunnel-gateway-2"] {
        let gw = service(name);
        assert_eq!(str_of(&gw["image"]), gw_image, "{name}");
        let env = environment(gw);
        for var in env.keys().filter(|k| k.starts_with("EDGEPLANE_")) {
            assert!(
                gw_env.contains(var),
                "{name}: {var} is no variable it reads"
            );
        }
        assert_eq!(env["EDGEPLANE_REDIS_URL"], "redis://redis:6379");
        assert_eq!(env["EDGEPLANE_DIAL_ADDR"], format!("{name}:8000"));
        assert_eq!(port_of(&env["EDGEPLANE_METRICS_ADDR"]), 9445);
        public.insert(env["EDGEPLANE_PUBLIC_ADDR"].clone());
        let published = published(gw);
        assert!(
            published.contains(&port_of(&env["EDGEPLANE_PUBLIC_ADDR"])),
            "{name}: publishes its public port: {published:?}"
        );
    }
    assert_eq!(public.len(), 2, "distinct public addresses: {public:?}");

    // The load balancer in front of both replicas.
    let haproxy = std::fs::read_to_string(root().join("ops/compose/haproxy.cfg")).unwrap();
    for name in ["control-plane-1", "control-plane-2"] {
        assert!(
            haproxy.contains(&format!("server {name} {name}:9443")),
            "{name} behind api"
        );
    }
    assert!(haproxy.contains("GET /readyz") && haproxy.contains("check port 9444"));

    // Prometheus on the compose scrape file and the shipped rules; Grafana provisioned.
    let prometheus = service("prometheus");
    assert_eq!(
        mount_of(prometheus, "compose/prometheus.yml").as_deref(),
        Some("/etc/prometheus/prometheus.yml")
    );
    assert_eq!(
        mount_of(prometheus, "prometheus/alerts.yml").as_deref(),
        Some("/etc/prometheus/alerts.yml")
    );
    let grafana = service("grafana");
    for (source, target) in [
        (
            "grafana/provisioning/datasources",
            "/etc/grafana/provisioning/datasources",
        ),
        (
            "grafana/provisioning/dashboards",
            "/etc/grafana/provisioning/dashboards",
        ),
        ("grafana/dashboards", "/var/lib/grafana/dashboards"),
    ] {
        assert_eq!(
            mount_of(grafana, source).as_deref(),
            Some(target),
            "grafana: {source}"
        );
    }

    // Every secret's file exists (what ops/generate-secrets writes).
    for (name, secret) in config["secrets"].as_mapping().expect("secrets") {
        let file = Path::new(str_of(&secret["file"]));
        let file = if file.is_absolute() {
            file.to_owned()
        } else {
            tmp.path().join("ops/compose").join(file)
        };
        assert!(file.exists(), "secret {name:?}: {} missing", file.display());
    }
}

#[test]
fn compose_prometheus_keeps_the_shipped_jobs_and_passes_promtool() {
    let shipped = yaml_file(&root().join("ops/prometheus/prometheus.yml"));
    let compose = yaml_file(&root().join("ops/compose/prometheus.yml"));
    let jobs = |v: &Value| -> BTreeMap<String, Value> {
        seq(&v["scrape_configs"])
            .iter()
            .map(|j| (str_of(&j["job_name"]).to_owned(), j.clone()))
            .collect()
    };
    let (shipped_jobs, compose_jobs) = (jobs(&shipped), jobs(&compose));
    assert_eq!(
        shipped_jobs.keys().collect::<Vec<_>>(),
        compose_jobs.keys().collect::<Vec<_>>(),
        "the compose scrape file has ops/prometheus/prometheus.yml's jobs"
    );
    for (name, job) in &shipped_jobs {
        let c = &compose_jobs[name];
        for field in ["metrics_path", "params", "scrape_interval"] {
            assert_eq!(job[field], c[field], "job {name}: {field}");
        }
        let targets: Vec<&str> = seq(&c["static_configs"])
            .iter()
            .flat_map(|s| seq(&s["targets"]))
            .map(str_of)
            .collect();
        let expected: &[&str] = if name == "edgeplane-gateway" {
            &["tunnel-gateway-1:9445", "tunnel-gateway-2:9445"]
        } else {
            &["control-plane-1:9444", "control-plane-2:9444"]
        };
        assert_eq!(
            targets, expected,
            "job {name}: the compose services' metrics ports"
        );
    }
    assert_eq!(shipped["rule_files"], compose["rule_files"]);

    // As the container sees it: the rules beside the config.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("ops/compose/prometheus.yml"),
        tmp.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        root().join("ops/prometheus/alerts.yml"),
        tmp.path().join("alerts.yml"),
    )
    .unwrap();
    run_ok(
        "promtool",
        &["check", "config", "prometheus.yml"],
        tmp.path(),
        PROMTOOL,
    );
}
