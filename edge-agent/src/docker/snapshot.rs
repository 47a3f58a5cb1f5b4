//! The tolerant snapshot mapper: the engine's raw JSON answers ([`EngineAnswers`]) into a
//! normalised [`Snapshot`] ([`map_snapshot`]); missing, `null` or mistyped fields become empty
//! values (Podman's Docker API returns `null` for some lists and leaves fields out).

use std::collections::BTreeMap;

use proto::snapshot::{Container, EngineInfo, Image, Network, Snapshot, Volume};
use serde_json::Value;

/// The raw JSON answers a snapshot is made of.
#[derive(Debug, Clone, Default)]
pub struct EngineAnswers {
    /// `GET /version`
    pub version: Value,
    /// `GET /info`
    pub info: Value,
    /// `GET /containers/json?all=1`
    pub containers: Value,
    /// `GET /images/json`
    pub images: Value,
    /// `GET /volumes`
    pub volumes: Value,
    /// `GET /networks`
    pub networks: Value,
}

/// Maps engine answers into a normalised [`Snapshot`] (with `taken_ms` 0). Missing, `null` or
/// mistyped fields become empty values.
pub fn map_snapshot(a: &EngineAnswers) -> Snapshot {
    let mut snap = Snapshot {
        taken_ms: 0,
        engine: engine_info(&a.version, &a.info),
        containers: list(&a.containers).iter().map(container).collect(),
        images: list(&a.images).iter().map(image).collect(),
        volumes: list(field(&a.volumes, "Volumes"))
            .iter()
            .map(|v| Volume {
                name: text(v, "Name"),
                driver: text(v, "Driver"),
                mountpoint: text(v, "Mountpoint"),
            })
            .collect(),
        networks: list(&a.networks)
            .iter()
            .map(|n| Network {
                id: text(n, "Id"),
                name: text(n, "Name"),
                driver: text(n, "Driver"),
                scope: text(n, "Scope"),
            })
            .collect(),
        stacks: Vec::new(),
    };
    snap.normalise();
    snap
}

fn engine_info(version: &Value, info: &Value) -> EngineInfo {
    let components = list(field(version, "Components"));
    let component_names = || components.iter().map(|c| text(c, "Name"));
    // Podman names itself in its components ("Podman Engine"); Docker in its platform
    // ("Docker Engine - Community"), where Podman puts "linux/amd64/debian-12".
    let name = component_names()
        .find(|n| n.contains("Podman"))
        .or_else(|| Some(text(field(version, "Platform"), "Name")).filter(|n| !n.is_empty()))
        .or_else(|| component_names().find(|n| !n.is_empty()))
        .unwrap_or_default();
    let mut os = text(info, "OperatingSystem");
    let os_version = text(info, "OSVersion");
    if !os.is_empty() && !os_version.is_empty() && !os.contains(&os_version) {
        os = format!("{os} {os_version}");
    }
    let first = |a: String, b: String| if a.is_empty() { b } else { a };
    EngineInfo {
        name,
        version: first(text(version, "Version"), text(info, "ServerVersion")),
        api_version: text(version, "ApiVersion"),
        os: first(os, text(version, "Os")),
        arch: first(text(version, "Arch"), text(info, "Architecture")),
        kernel_version: first(text(version, "KernelVersion"), text(info, "KernelVersion")),
        cpus: u32::try_from(int(info, "NCPU").max(0)).unwrap_or(u32::MAX),
        memory_bytes: u64::try_from(int(info, "MemTotal").max(0)).unwrap_or(0),
    }
}

fn container(c: &Value) -> Container {
    Container {
        id: text(c, "Id"),
        names: list(field(c, "Names"))
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        image: text(c, "Image"),
        image_id: text(c, "ImageID"),
        command: text(c, "Command"),
        state: text(c, "State"),
        created: int(c, "Created"),
        labels: labels(field(c, "Labels")),
        ports: list(field(c, "Ports")).iter().map(port).collect(),
    }
}

/// `ip:public->private/type`, `public->private/type` without an address, `private/type`
/// when not published.
fn port(p: &Value) -> String {
    let private = int(p, "PrivatePort");
    let kind = Some(text(p, "Type"))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "tcp".to_owned());
    let public = int(p, "PublicPort");
    if public == 0 {
        return format!("{private}/{kind}");
    }
    match text(p, "IP") {
        ip if ip.is_empty() => format!("{public}->{private}/{kind}"),
        ip if ip.contains(':') => format!("[{ip}]:{public}->{private}/{kind}"),
        ip => format!("{ip}:{public}->{private}/{kind}"),
    }
}

fn image(i: &Value) -> Image {
    Image {
        id: text(i, "Id"),
        tags: list(field(i, "RepoTags"))
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "<none>:<none>")
            .map(str::to_owned)
            .collect(),
        size: int(i, "Size"),
        created: int(i, "Created"),
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn int(v: &Value, key: &str) -> i64 {
    match v.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn podman_like_answers_with_nulls_map_cleanly() {
        let answers = EngineAnswers {
            version: json!({
                "Platform": {"Name": "linux/amd64/debian-12"},
                "Components": [{"Name": "Podman Engine", "Version": "4.3.1"}, {"Name": "Conmon"}],
                "Version": "4.3.1", "ApiVersion": "1.41", "Os": "linux", "Arch": "amd64",
                "KernelVersion": "6.1.0"
            }),
            info: json!({
                "NCPU": 2, "MemTotal": 25_276_063_744u64, "OperatingSystem": "debian",
                "OSVersion": "12", "Labels": null, "GenericResources": null
            }),
            containers: json!([
                {
                    "Id": "bbb", "Names": ["/web"], "Image": "busybox", "ImageID": "sha256:1",
                    "Command": "sleep 3600", "Created": 1_795_448_068, "State": "running",
                    "Ports": [{"PrivatePort": 80, "PublicPort": 8088, "Type": "tcp"}],
                    "Labels": {"com.docker.compose.project": "shop",
                               "com.docker.compose.service": "web"}
                },
                {
                    "Id": "aaa", "Names": null, "Image": null, "Command": null,
                    "Created": null, "State": "created", "Ports": null, "Labels": null,
                    "Mounts": null
                },
                {"Id": "ccc", "Ports": [
                    {"IP": "0.0.0.0", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
                    {"IP": "::", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
                    {"PrivatePort": 9000}
                ]},
                "not an object"
            ]),
            images: json!([
                {"Id": "sha256:2", "RepoTags": null, "Size": 10, "Created": 5},
                {"Id": "sha256:1", "RepoTags": ["<none>:<none>", "busybox:latest"],
                 "Size": 1_997_912, "Created": 1_795_448_057u64, "Labels": null}
            ]),
            volumes: json!({"Volumes": null, "Warnings": null}),
            networks: json!([
                {"Name": "podman", "Id": "2f25", "Driver": "bridge", "Scope": "local",
                 "Labels": null, "Containers": null}
            ]),
        };
        let snap = map_snapshot(&answers);
        assert_eq!(snap.engine.name, "Podman Engine");
        assert_eq!(snap.engine.version, "4.3.1");
        assert_eq!(snap.engine.api_version, "1.41");
        assert_eq!(snap.engine.os, "debian 12");
        assert_eq!(snap.engine.arch, "amd64");
        assert_eq!(snap.engine.kernel_version, "6.1.0");
        assert_eq!(snap.engine.cpus, 2);
        assert_eq!(snap.engine.memory_bytes, 25_276_063_744);

        let ids: Vec<_> = snap.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            ["", "aaa", "bbb", "ccc"],
            "sorted; garbage entries are empty"
        );
        let aaa = &snap.containers[1];
        assert!(aaa.names.is_empty() && aaa.ports.is_empty() && aaa.labels.is_empty());
        assert_eq!(aaa.created, 0);
        let web = &snap.containers[2];
        assert_eq!(web.names, ["web"]);
        assert_eq!(web.ports, ["8088->80/tcp"]);
        assert_eq!(web.image_id, "sha256:1");
        assert_eq!(web.command, "sleep 3600");
        assert_eq!(
            snap.containers[3].ports,
            ["0.0.0.0:5353->53/udp", "9000/tcp", "[::]:5353->53/udp"]
        );
        assert_eq!(snap.stacks.len(), 1);
        assert_eq!(snap.stacks[0].name, "shop");
        assert_eq!(snap.stacks[0].running, 1);

        assert_eq!(snap.images.len(), 2);
        assert_eq!(snap.images[0].tags, ["busybox:latest"]);
        assert!(snap.images[1].tags.is_empty());
        assert!(snap.volumes.is_empty());
        assert_eq!(snap.networks[0].name, "podman");
        assert_eq!(snap.networks[0].scope, "local");
    }

    #[test]
    fn docker_answers_and_empty_answers() {
        let answers = EngineAnswers {
            version: json!({
                "Platform": {"Name": "Docker Engine - Community"},
                "Components": [{"Name": "Engine"}], "Version": "27.1.1"
            }),
            info: json!({"OperatingSystem": "Ubuntu 22.04.4 LTS", "OSVersion": "22.04",
                         "Architecture": "x86_64", "NCPU": -3}),
            volumes: json!({"Volumes": [
                {"Name": "b", "Driver": "local", "Mountpoint": "/v/b"},
                {"Name": "a", "Driver": "local", "Mountpoint": null}
            ]}),
            ..EngineAnswers::default()
        };
        let snap = map_snapshot(&answers);
        assert_eq!(snap.engine.name, "Docker Engine - Community");
        assert_eq!(snap.engine.os, "Ubuntu 22.04.4 LTS");
        assert_eq!(snap.engine.arch, "x86_64");
        assert_eq!(snap.engine.cpus, 0);
        assert_eq!(snap.volumes[0].name, "a");
        assert_eq!(snap.volumes[0].mountpoint, "");
        assert!(snap.containers.is_empty() && snap.images.is_empty());
        assert_eq!(map_snapshot(&EngineAnswers::default()), Snapshot::default());
    }
}
