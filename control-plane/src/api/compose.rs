//! The compose files a `stackDeploy` command accepts, turned into [`ServiceSpec`]s at queue
//! time: the agent gets a compact, checked description (no YAML crosses the metered link),
//! and a file that could not run is refused here, with the reason.
//!
//! Supported per service: `image` (required), `command`, `entrypoint` (string or list),
//! `environment`, `labels` (list or map), `ports` (`"80"`, `"8080:80"`, `"127.0.0.1:8080:80"`,
//! optional `/udp`), `restart`, `volumes` (`name:/path[:ro]`, `/host:/path[:ro]`). Anything
//! else (`build`, `depends_on`, networks, ...) is refused by name rather than ignored.

use std::collections::BTreeMap;

use proto::async_mode::{PortSpec, ServiceSpec};
use serde::Deserialize;

/// Largest compose file accepted.
pub const MAX_COMPOSE_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeFile {
    #[allow(dead_code)]
    version: Option<serde_yaml::Value>,
    #[allow(dead_code)]
    name: Option<String>,
    services: BTreeMap<String, Service>,
    /// Named volumes are created by the engine when a container first uses them.
    #[allow(dead_code)]
    volumes: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    image: String,
    command: Option<Words>,
    entrypoint: Option<Words>,
    environment: Option<ListOrMap>,
    labels: Option<ListOrMap>,
    ports: Option<Vec<Port>>,
    restart: Option<String>,
    volumes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Words {
    Line(String),
    List(Vec<String>),
}

impl Words {
    fn into_vec(self) -> Vec<String> {
        match self {
            Words::Line(l) => l.split_whitespace().map(str::to_owned).collect(),
            Words::List(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ListOrMap {
    List(Vec<String>),
    Map(BTreeMap<String, serde_yaml::Value>),
}

fn scalar(v: &serde_yaml::Value) -> Result<String, String> {
    match v {
        serde_yaml::Value::Null => Ok(String::new()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::String(s) => Ok(s.clone()),
        _ => Err("values must be strings, numbers or booleans".to_owned()),
    }
}

impl ListOrMap {
    /// As `KEY=VALUE` entries.
    fn entries(self) -> Result<Vec<String>, String> {
        match self {
            ListOrMap::List(l) => Ok(l),
            ListOrMap::Map(m) => m
                .into_iter()
                .map(|(k, v)| Ok(format!("{k}={}", scalar(&v)?)))
                .collect(),
        }
    }

    fn into_map(self) -> Result<BTreeMap<String, String>, String> {
        self.entries()?
            .into_iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                None => Ok((e, String::new())),
            })
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u16),
    Text(String),
}

fn parse_port(p: Port) -> Result<PortSpec, String> {
    let text = match p {
        Port::Number(n) => n.to_string(),
        Port::Text(t) => t,
    };
    let (spec, protocol) = match text.split_once('/') {
        Some((s, proto)) => (s, proto.to_owned()),
        None => (text.as_str(), "tcp".to_owned()),
    };
    let num = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("port {text:?}: {s:?} is not a port number"))
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host_ip, host_port, container) = match parts.as_slice() {
        [c] => (None, None, *c),
        [h, c] => (None, Some(num(h)?), *c),
        [ip, h, c] => (Some((*ip).to_owned()), Some(num(h)?), *c),
        _ => return Err(format!("port {text:?} is not [ip:]host:container[/proto]")),
    };
    Ok(PortSpec {
        host_ip,
        host_port,
        container_port: num(container)?,
        protocol,
    })
}

/// Parses a compose file into the services of a stack deploy.
pub fn parse(yaml: &str) -> Result<Vec<ServiceSpec>, String> {
    if yaml.len() > MAX_COMPOSE_BYTES {
        return Err(format!(
            "the compose file has {} bytes, more than {MAX_COMPOSE_BYTES}",
            yaml.len()
        ));
    }
    let file: ComposeFile = serde_yaml::from_str(yaml).map_err(|e| format!("compose file: {e}"))?;
    file.services
        .into_iter()
        .map(|(name, s)| {
            let context = |e: String| format!("service {name}: {e}");
            Ok(ServiceSpec {
                image: s.image,
                command: s.command.map(Words::into_vec),
                entrypoint: s.entrypoint.map(Words::into_vec),
                environment: s
                    .environment
                    .map(ListOrMap::entries)
                    .transpose()
                    .map_err(context)?
                    .unwrap_or_default(),
                ports: s
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .map(parse_port)
                    .collect::<Result<_, _>>()
                    .map_err(context)?,
                labels: s
                    .labels
                    .map(ListOrMap::into_map)
                    .transpose()
                    .map_err(context)?
                    .unwrap_or_default(),
                restart: s.restart,
                volumes: s.volumes.unwrap_or_default(),
                name,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_small_compose_file_becomes_services() {
        let services = parse(
            r#"
services:
  web:
    image: nginx:1.27
    command: nginx -g "daemon off;"
    environment:
      MODE: kiosk
      RETRIES: 3
    ports: ["8080:80", "127.0.0.1:9000:9000/udp", 443]
    labels: [tier=front]
    restart: unless-stopped
    volumes: ["data:/var/data:ro"]
  worker:
    image: busybox
    command: ["sleep", "600"]
volumes:
  data: {}
"#,
        )
        .unwrap();
        assert_eq!(services.len(), 2);
        let web = &services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.environment, vec!["MODE=kiosk", "RETRIES=3"]);
        assert_eq!(web.ports.len(), 3);
        assert_eq!(web.ports[1].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(web.ports[1].protocol, "udp");
        assert_eq!(web.ports[2].host_port, None);
        assert_eq!(web.labels["tier"], "front");
        assert_eq!(
            services[1].command.as_deref(),
            Some(&["sleep".to_owned(), "600".to_owned()][..])
        );
    }

    #[test]
    fn what_cannot_run_is_refused_by_name() {
        let e = parse("services:\n  web:\n    build: .\n").unwrap_err();
        assert!(e.contains("build"), "{e}");
        let e = parse("services:\n  web:\n    command: x\n").unwrap_err();
        assert!(e.contains("image"), "{e}");
        let e = parse("services:\n  web:\n    image: x\n    ports: [\"80:http\"]\n").unwrap_err();
        assert!(e.contains("not a port number"), "{e}");
        assert!(parse("not: [valid").is_err());
        assert!(parse(&"#".repeat(MAX_COMPOSE_BYTES + 1)).is_err());
    }
}
