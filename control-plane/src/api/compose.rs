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
use proto::stacks::{
    Condition as DepCondition, ContainerExtras, Dependency, Healthcheck, PullPolicy,
    StackService as WireService, StackSpec,
};
use serde::Deserialize;

/// Services an edge stack may have.
pub const MAX_STACK_SERVICES: usize = 64;
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
        .map(|(name, s)| s.into_spec(name))
        .collect()
}

impl Service {
    /// Service `name` in the engine API's terms; an error names the service.
    fn into_spec(self, name: String) -> Result<ServiceSpec, String> {
        let context = |e: String| format!("service {name}: {e}");
        Ok(ServiceSpec {
            image: self.image,
            command: self.command.map(Words::into_vec),
            entrypoint: self.entrypoint.map(Words::into_vec),
            environment: self
                .environment
                .map(ListOrMap::entries)
                .transpose()
                .map_err(context)?
                .unwrap_or_default(),
            ports: self
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(parse_port)
                .collect::<Result<_, _>>()
                .map_err(context)?,
            labels: self
                .labels
                .map(ListOrMap::into_map)
                .transpose()
                .map_err(context)?
                .unwrap_or_default(),
            restart: self.restart,
            volumes: self.volumes.unwrap_or_default(),
            name,
        })
    }
}

/// An edge stack's compose file, as far as it is checked when it is stored: what edge users
/// write (several services, `depends_on` ordering, named networks and volumes, `environment`,
/// `restart`, `healthcheck`); values may hold `${VARIABLE}`s, which are only known per
/// environment, so they are checked for shape, not content.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFile {
    #[allow(dead_code)]
    version: Option<serde_yaml::Value>,
    #[allow(dead_code)]
    name: Option<String>,
    services: BTreeMap<String, StackService>,
    networks: Option<BTreeMap<String, Option<serde_yaml::Value>>>,
    volumes: Option<BTreeMap<String, Option<serde_yaml::Value>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StackService {
    image: String,
    command: Option<Words>,
    entrypoint: Option<Words>,
    environment: Option<ListOrMap>,
    labels: Option<ListOrMap>,
    ports: Option<Vec<Port>>,
    restart: Option<String>,
    volumes: Option<Vec<String>>,
    depends_on: Option<DependsOn>,
    networks: Option<Networks>,
    healthcheck: Option<ComposeHealthcheck>,
    user: Option<String>,
    working_dir: Option<String>,
    hostname: Option<String>,
    privileged: Option<bool>,
    devices: Option<Vec<String>>,
    network_mode: Option<String>,
    stop_grace_period: Option<String>,
    pull_policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DependsOn {
    List(Vec<String>),
    /// `service: {condition: service_started | service_healthy | service_completed_successfully}`
    Map(BTreeMap<String, Condition>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    condition: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Networks {
    List(Vec<String>),
    Map(BTreeMap<String, Option<serde_yaml::Value>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeHealthcheck {
    test: Option<Words>,
    interval: Option<String>,
    timeout: Option<String>,
    retries: Option<serde_yaml::Value>,
    start_period: Option<String>,
    disable: Option<bool>,
}

/// Checks an edge stack's compose file: its shape (unknown keys refused by name), at least one
/// service, each with an image, `depends_on` naming services of the file without a cycle,
/// networks declared at the top level, `restart` and `pull_policy` values compose knows.
pub fn check_stack_file(yaml: &str) -> Result<(), String> {
    if yaml.len() > MAX_COMPOSE_BYTES {
        return Err(format!(
            "the compose file has {} bytes, more than {MAX_COMPOSE_BYTES}",
            yaml.len()
        ));
    }
    let file: StackFile = serde_yaml::from_str(yaml).map_err(|e| format!("compose file: {e}"))?;
    if file.services.is_empty() {
        return Err("compose file: no services".into());
    }
    if file.services.len() > MAX_STACK_SERVICES {
        return Err(format!(
            "compose file: {} services, more than {MAX_STACK_SERVICES}",
            file.services.len()
        ));
    }
    let declared = file.networks.unwrap_or_default();
    let volumes = file.volumes.unwrap_or_default();
    let mut after: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, s) in &file.services {
        if s.image.trim().is_empty() {
            return Err(format!("service {name}: image is empty"));
        }
        if let Some(r) = s.restart.as_deref() {
            let known = ["no", "always", "on-failure", "unless-stopped"];
            if !r.contains("${")
                && !known
                    .iter()
                    .any(|k| r == *k || r.starts_with("on-failure:"))
            {
                return Err(format!(
                    "service {name}: restart {r:?} is not one of no, always, on-failure[:n], unless-stopped"
                ));
            }
        }
        if let Some(p) = s.pull_policy.as_deref() {
            if !["missing", "always", "never", "if_not_present"].contains(&p) {
                return Err(format!(
                    "service {name}: pull_policy {p:?} is not one of missing, always, never"
                ));
            }
        }
        let deps: Vec<&str> = match &s.depends_on {
            None => Vec::new(),
            Some(DependsOn::List(l)) => l.iter().map(String::as_str).collect(),
            Some(DependsOn::Map(m)) => {
                for (dep, c) in m {
                    if let Some(c) = c.condition.as_deref() {
                        let known = [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully",
                        ];
                        if !known.contains(&c) {
                            return Err(format!(
                                "service {name}: depends_on {dep}: condition {c:?} is not one of {known:?}"
                            ));
                        }
                    }
                }
                m.keys().map(String::as_str).collect()
            }
        };
        for dep in &deps {
            if !file.services.contains_key(*dep) {
                return Err(format!(
                    "service {name}: depends_on {dep:?}, which is not a service of this file"
                ));
            }
        }
        after.insert(name, deps);
        let nets: Vec<&str> = match &s.networks {
            None => Vec::new(),
            Some(Networks::List(l)) => l.iter().map(String::as_str).collect(),
            Some(Networks::Map(m)) => m.keys().map(String::as_str).collect(),
        };
        for net in nets {
            if net != "default" && !declared.contains_key(net) {
                return Err(format!(
                    "service {name}: network {net:?} is not declared under networks"
                ));
            }
        }
        for v in s.volumes.iter().flatten() {
            let source = v.split(':').next().unwrap_or_default();
            let named = v.contains(':')
                && !source.is_empty()
                && !source.contains("${")
                && !source.starts_with(['/', '.', '~']);
            if named && !volumes.contains_key(source) {
                return Err(format!(
                    "service {name}: volume {source:?} is not declared under volumes"
                ));
            }
        }
        for p in s.ports.iter().flatten() {
            match p {
                Port::Text(t) if t.contains("${") => {}
                other => {
                    let text = match other {
                        Port::Number(n) => Port::Number(*n),
                        Port::Text(t) => Port::Text(t.clone()),
                    };
                    parse_port(text).map_err(|e| format!("service {name}: {e}"))?;
                }
            }
        }
    }
    // `depends_on` must be an order: no service waits, through others, for itself.
    let mut done: Vec<&str> = Vec::new();
    while done.len() < after.len() {
        let ready: Vec<&str> = after
            .iter()
            .filter(|(n, deps)| !done.contains(n) && deps.iter().all(|d| done.contains(d)))
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&str> = after
                .keys()
                .copied()
                .filter(|n| !done.contains(n))
                .collect();
            return Err(format!("depends_on goes round in a circle among {stuck:?}"));
        }
        done.extend(ready);
    }
    Ok(())
}

/// An edge stack's compose file, rendered for one environment (no `${...}` left), as the
/// agent gets it: checked ([`check_stack_file`]) and turned into the engine API's terms.
pub fn stack_spec(yaml: &str) -> Result<StackSpec, String> {
    check_stack_file(yaml)?;
    let file: StackFile = serde_yaml::from_str(yaml).map_err(|e| format!("compose file: {e}"))?;
    let mut services = Vec::with_capacity(file.services.len());
    for (name, s) in file.services {
        let context = |e: String| format!("service {name}: {e}");
        let depends_on = match s.depends_on {
            None => Vec::new(),
            Some(DependsOn::List(l)) => l
                .into_iter()
                .map(|service| Dependency {
                    service,
                    condition: DepCondition::Started,
                })
                .collect(),
            Some(DependsOn::Map(m)) => m
                .into_iter()
                .map(|(service, c)| Dependency {
                    service,
                    condition: match c.condition.as_deref() {
                        Some("service_healthy") => DepCondition::Healthy,
                        Some("service_completed_successfully") => {
                            DepCondition::CompletedSuccessfully
                        }
                        _ => DepCondition::Started,
                    },
                })
                .collect(),
        };
        let networks = match s.networks {
            None => Vec::new(),
            Some(Networks::List(l)) => l,
            Some(Networks::Map(m)) => m.into_keys().collect(),
        };
        let healthcheck = match s.healthcheck {
            Some(h) if h.disable == Some(true) => Some(Healthcheck {
                test: vec!["NONE".into()],
                interval_ms: 0,
                timeout_ms: 0,
                retries: 0,
                start_period_ms: 0,
            }),
            Some(h) => {
                let test = match h.test {
                    None => Vec::new(),
                    Some(Words::Line(l)) => vec!["CMD-SHELL".into(), l],
                    Some(Words::List(l)) => l,
                };
                let ms = |d: Option<String>, what: &str| {
                    d.map(|d| duration_ms(&d).map_err(|e| format!("healthcheck {what}: {e}")))
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                let retries = match h.retries {
                    None => 0,
                    Some(serde_yaml::Value::Number(n)) => n
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| context("healthcheck retries is not a count".into()))?,
                    Some(_) => return Err(context("healthcheck retries is not a count".into())),
                };
                Some(Healthcheck {
                    test,
                    interval_ms: ms(h.interval, "interval").map_err(context)?,
                    timeout_ms: ms(h.timeout, "timeout").map_err(context)?,
                    retries,
                    start_period_ms: ms(h.start_period, "start_period").map_err(context)?,
                })
            }
            None => None,
        };
        let pull = match s.pull_policy.as_deref() {
            Some("always") => PullPolicy::Always,
            Some("never") => PullPolicy::Never,
            _ => PullPolicy::Missing,
        };
        let stop_grace_secs = s
            .stop_grace_period
            .map(|d| duration_ms(&d).map(|ms| u32::try_from(ms / 1000).unwrap_or(u32::MAX)))
            .transpose()
            .map_err(|e| context(format!("stop_grace_period: {e}")))?;
        // The container itself: what a `stackDeploy` service holds too.
        let container = Service {
            image: s.image,
            command: s.command,
            entrypoint: s.entrypoint,
            environment: s.environment,
            labels: s.labels,
            ports: s.ports,
            restart: s.restart,
            volumes: s.volumes,
        }
        .into_spec(name.clone())?;
        services.push(WireService {
            container,
            depends_on,
            networks,
            healthcheck,
            pull,
            extras: ContainerExtras {
                user: s.user,
                working_dir: s.working_dir,
                hostname: s.hostname,
                privileged: s.privileged.unwrap_or(false),
                devices: s.devices.unwrap_or_default(),
                network_mode: s.network_mode,
                stop_grace_secs,
            },
        });
    }
    Ok(StackSpec {
        services,
        networks: file.networks.unwrap_or_default().into_keys().collect(),
        volumes: file.volumes.unwrap_or_default().into_keys().collect(),
    })
}

/// A compose duration (`1m30s`, `10s`, `500ms`, `1h`) in milliseconds.
fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a duration such as 30s or 1m30s");
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        total = total
            .checked_add(n.checked_mul(factor).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
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
    fn stack_files_take_what_edge_users_write_and_refuse_what_cannot_run() {
        let file = r#"
services:
  db:
    image: postgres:16
    restart: unless-stopped
    environment:
      POSTGRES_PASSWORD: ${DB_PASSWORD}
    volumes: ["pgdata:/var/lib/postgresql/data"]
    networks: [back]
    healthcheck:
      test: ["CMD", "pg_isready"]
      interval: 10s
      timeout: 3s
      retries: 5
  app:
    image: registry.local/app:${APP_TAG}
    depends_on:
      db: {condition: service_healthy}
    networks: [back, front]
    ports: ["${APP_PORT}:8080", "9090:9090"]
  proxy:
    image: caddy:2
    depends_on: [app]
    networks: [front]
networks:
  back: {}
  front:
volumes:
  pgdata:
"#;
        check_stack_file(file).unwrap();
        for (bad, says) in [
            ("services: {}", "no services"),
            (
                "services:
  a:
    image: x
    build: .
",
                "build",
            ),
            (
                "services:
  a:
    image: x
    depends_on: [b]
",
                "not a service",
            ),
            (
                "services:
  a:
    image: x
    depends_on: [b]
  b:
    image: y
    depends_on: [a]
",
                "circle",
            ),
            (
                "services:
  a:
    image: x
    networks: [lan]
",
                "not declared",
            ),
            (
                "services:
  a:
    image: x
    restart: sometimes
",
                "restart",
            ),
            (
                "services:
  a:
    image: x
    depends_on:
      b: {condition: soon}
  b:
    image: y
",
                "condition",
            ),
            (
                r#"services:
  a:
    image: x
    ports: ["80:http"]
"#,
                "not a port number",
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: [\"data:/d\", \"/srv:/s\"]\n",
                "not declared under volumes",
            ),
        ] {
            let e = check_stack_file(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_rendered_stack_file_becomes_the_agents_spec() {
        let spec = stack_spec(
            r#"
services:
  db:
    image: postgres:16
    healthcheck:
      test: pg_isready
      interval: 1m30s
      timeout: 500ms
      retries: 5
    volumes: ["pgdata:/var/lib/postgresql/data"]
    networks: [back]
    pull_policy: never
    stop_grace_period: 20s
  app:
    image: registry.local/app:1.2
    depends_on:
      db: {condition: service_healthy}
    networks: [back]
    privileged: true
networks:
  back:
volumes:
  pgdata:
"#,
        )
        .unwrap();
        assert_eq!(spec.networks, vec!["back"]);
        assert_eq!(spec.volumes, vec!["pgdata"]);
        let app = &spec.services[0];
        assert_eq!(app.container.name, "app");
        assert_eq!(app.depends_on[0].service, "db");
        assert_eq!(app.depends_on[0].condition, DepCondition::Healthy);
        assert!(app.extras.privileged);
        let db = &spec.services[1];
        let h = db.healthcheck.as_ref().unwrap();
        assert_eq!(h.test, vec!["CMD-SHELL", "pg_isready"]);
        assert_eq!((h.interval_ms, h.timeout_ms, h.retries), (90_000, 500, 5));
        assert_eq!(db.pull, PullPolicy::Never);
        assert_eq!(db.extras.stop_grace_secs, Some(20));
        for bad in ["", "10", "5x", "1m5"] {
            assert!(duration_ms(bad).is_err(), "{bad:?}");
        }
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
