//! Writes seed inputs for the fuzz targets (valid messages of every kind, so a fresh corpus
//! starts past bincode's framing):
//!     cargo run --manifest-path proto/fuzz/Cargo.toml --example seeds -- proto/fuzz/corpus
//! The corpus is not committed; re-run this after a fresh checkout before a long campaign.
use std::collections::BTreeMap;
use std::path::Path;

use proto::async_mode::*;
use proto::codec::encode;
use proto::proof::{sign, ProofKey, Route};
use proto::snapshot::*;
use proto::token::JoinSecret;
use proto::wire::{AgentInfo, CheckinRequest, Platform};
use uuid::Uuid;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
}

fn base() -> Snapshot {
    let mut s = Snapshot {
        taken_ms: 1,
        containers: vec![Container {
            id: "a".into(),
            names: vec!["web".into()],
            state: "running".into(),
            ..Container::default()
        }],
        volumes: vec![Volume {
            name: "data".into(),
            ..Volume::default()
        }],
        ..Snapshot::default()
    };
    let _ = s.normalise();
    s
}

fn rich() -> Snapshot {
    let mut labels = BTreeMap::new();
    labels.insert(COMPOSE_PROJECT_LABEL.to_owned(), "shop".to_owned());
    labels.insert(COMPOSE_SERVICE_LABEL.to_owned(), "web".to_owned());
    let mut s = Snapshot {
        taken_ms: 99,
        engine: EngineInfo {
            name: "Docker Engine".into(),
            version: "27.1".into(),
            api_version: "1.46".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            kernel_version: "6.1".into(),
            cpus: 4,
            memory_bytes: 1 << 33,
        },
        containers: vec![
            Container {
                id: "a".into(),
                names: vec!["/web".into()],
                image: "busybox".into(),
                image_id: "sha256:1".into(),
                command: "sleep 1".into(),
                state: "running".into(),
                created: 5,
                labels,
                ports: vec!["0.0.0.0:80->80/tcp".into(), "53/udp".into()],
            },
            Container {
                id: "b".into(),
                state: "exited".into(),
                ..Container::default()
            },
        ],
        images: vec![Image {
            id: "sha256:1".into(),
            tags: vec!["busybox:latest".into()],
            size: 10,
            created: 2,
        }],
        volumes: vec![Volume {
            name: "data".into(),
            driver: "local".into(),
            mountpoint: "/v".into(),
        }],
        networks: vec![Network {
            id: "n1".into(),
            name: "bridge".into(),
            driver: "bridge".into(),
            scope: "local".into(),
        }],
        stacks: Vec::new(),
    };
    let _ = s.normalise();
    s
}

fn actions() -> Vec<Action> {
    let svc = ServiceSpec {
        name: "web".into(),
        image: "busybox:latest".into(),
        command: Some(vec!["sleep".into(), "60".into()]),
        entrypoint: None,
        environment: vec!["A=1".into()],
        ports: vec![PortSpec {
            host_ip: Some("127.0.0.1".into()),
            host_port: Some(8080),
            container_port: 80,
            protocol: "tcp".into(),
        }],
        labels: [("k".to_owned(), "v".to_owned())].into_iter().collect(),
        restart: Some("always".into()),
        volumes: vec!["data:/data".into()],
    };
    vec![
        Action::ContainerStart {
            container: "web".into(),
        },
        Action::ContainerStop {
            container: "web".into(),
            timeout_secs: Some(10),
        },
        Action::ContainerRestart {
            container: "web".into(),
            timeout_secs: None,
        },
        Action::ContainerKill {
            container: "web".into(),
            signal: Some("HUP".into()),
        },
        Action::ContainerRemove {
            container: "web".into(),
            force: true,
        },
        Action::ImageRemove {
            image: "busybox".into(),
            force: false,
        },
        Action::VolumeRemove {
            volume: "data".into(),
            force: false,
        },
        Action::StackRemove {
            stack: "shop".into(),
        },
        Action::StackDeploy {
            stack: "shop".into(),
            services: vec![svc],
        },
    ]
}

fn write(dir: &Path) {
    // snapshot
    for (name, s) in [
        ("empty", Snapshot::default()),
        ("base", base()),
        ("rich", rich()),
    ] {
        put(
            dir,
            "snapshot",
            &format!("{name}-frame"),
            &encode(&s).unwrap(),
        );
        put(
            dir,
            "snapshot",
            &format!("{name}-zstd"),
            &compress(&s).unwrap(),
        );
    }
    // delta
    let mut changed = rich();
    changed.taken_ms = 100;
    for (name, old, new) in [
        ("base-rich", base(), rich()),
        ("rich-base", rich(), base()),
        ("base-base", base(), base()),
        ("empty-base", Snapshot::default(), base()),
        ("rich-changed", rich(), changed),
    ] {
        let d = diff(&old, &new).unwrap();
        put(dir, "delta", &format!("{name}-frame"), &encode(&d).unwrap());
        put(
            dir,
            "delta",
            &format!("{name}-zstd"),
            &compress_delta(&d).unwrap(),
        );
    }
    // async mode
    let checkin = CheckinRequest {
        endpoint_id: 7,
        edge_id: Some(Uuid::nil()),
        timestamp_lo: 5,
        timestamp_hi: Some(1),
        interval_secs: 60,
        agent: Some(AgentInfo {
            version: "0.1.0".into(),
            platform: Platform::Docker,
            hostname: "edge-1".into(),
        }),
    };
    let delta = compress_delta(&diff(&base(), &rich()).unwrap()).unwrap();
    let reqs = [
        AsyncRequest {
            checkin: checkin.clone(),
            snapshot: Some(SnapshotReport::Full(compress(&rich()).unwrap())),
            results: vec![
                CommandResult { id: 1, error: None },
                CommandResult {
                    id: 2,
                    error: Some("no such container".into()),
                },
            ],
            done_through: Some(2),
        },
        AsyncRequest {
            checkin: CheckinRequest {
                edge_id: None,
                timestamp_hi: None,
                agent: None,
                ..checkin.clone()
            },
            snapshot: Some(SnapshotReport::Delta(delta)),
            results: Vec::new(),
            done_through: None,
        },
        AsyncRequest {
            checkin: CheckinRequest {
                agent: None,
                ..checkin.clone()
            },
            snapshot: Some(SnapshotReport::Unchanged { digest: 42 }),
            results: Vec::new(),
            done_through: Some(0),
        },
    ];
    let commands: Vec<Command> = actions()
        .into_iter()
        .enumerate()
        .map(|(i, action)| Command {
            id: i as u64 + 1,
            action,
        })
        .collect();
    let answer = AsyncAnswer {
        intervals: AsyncIntervals {
            ping: 60,
            snapshot: 60,
            command: 60,
        },
        server_time_ms: Some(1),
        snapshot_ack: Some(2),
        need_full_snapshot: true,
        commands: commands.clone(),
        desired: Some(3),
    };
    let idle = AsyncAnswer {
        commands: Vec::new(),
        server_time_ms: None,
        snapshot_ack: None,
        need_full_snapshot: false,
        desired: None,
        ..answer.clone()
    };
    for (i, r) in reqs.iter().enumerate() {
        put(
            dir,
            "async_mode",
            &format!("request-{i}"),
            &encode(r).unwrap(),
        );
    }
    put(dir, "async_mode", "answer", &encode(&answer).unwrap());
    put(dir, "async_mode", "answer-idle", &encode(&idle).unwrap());
    for c in &commands {
        put(
            dir,
            "async_mode",
            &format!("command-{}", c.id),
            &encode(c).unwrap(),
        );
        put(
            dir,
            "async_mode",
            &format!("action-{}", c.id),
            &encode(&c.action).unwrap(),
        );
    }
    put(
        dir,
        "async_mode",
        "result",
        &encode(&CommandResult {
            id: 3,
            error: Some("x".into()),
        })
        .unwrap(),
    );
    // signed frames of uploads and async requests
    let key = ProofKey::derive(&JoinSecret::from_bytes([1; 32]), None);
    let upload = SnapshotUpload {
        endpoint_id: 7,
        edge_id: Uuid::nil(),
        timestamp_ms: 1,
        body: compress(&rich()).unwrap(),
    };
    put(
        dir,
        "signed_frame",
        "upload",
        &sign(&upload, Route::Snapshot, &key, &Uuid::nil(), 1).unwrap(),
    );
    for (i, r) in reqs.iter().enumerate() {
        put(
            dir,
            "signed_frame",
            &format!("async-{i}"),
            &sign(r, Route::Async, &key, &Uuid::nil(), 1).unwrap(),
        );
    }
    put(
        dir,
        "signed_frame",
        "checkin",
        &sign(&checkin, Route::Checkin, &key, &Uuid::nil(), 1).unwrap(),
    );
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus".to_owned());
    write(Path::new(&dir));
    println!("seeds written under {dir}");
}
