#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What the logs of a control plane and its agent never show, at any level: the join key, the
//! admin key, `AGENT_SECRET`; and above debug, the Edge ID (with the join key it impersonates
//! a bound agent, and logs travel further than keys). Everything runs in this process, under
//! one subscriber that records every line at debug.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use testkit::{eventually, Agent, ControlPlane, ADMIN_KEY};
use tracing_subscriber::fmt::MakeWriter;
use uuid::Uuid;

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Lines;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn capture() -> &'static Lines {
    static LINES: OnceLock<Lines> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        lines
    })
}

#[actix_web::test]
async fn keys_secrets_and_edge_ids_stay_out_of_the_logs() {
    let lines = capture();
    const AGENT_SECRET: &str = "agent-s3cret-for-the-log-test";
    let cp = ControlPlane::start_with(|c| c.agent_secret = Some(AGENT_SECRET.to_owned())).await;
    let (id, key) = testkit::api::create_env_key(&cp.url, json!({"name": "kiosk"})).await;
    let token = proto::JoinToken::parse(&key).unwrap();
    let edge_id = Uuid::new_v4();

    // The real agent binds, an impostor is refused, a tunnel opens and serves a call.
    let agent = Agent::start(edge_agent::Args {
        edge_key: Some(key.clone()),
        edge_id: Some(edge_id.to_string()),
        agent_secret: Some(AGENT_SECRET.to_owned()),
        ..Default::default()
    });
    eventually(Duration::from_secs(15), "agent up", || async {
        (cp.get_env(id).await["status"] == "up").then_some(())
    })
    .await;
    let mut options = edge_agent::PollOptions::new(Uuid::new_v4());
    options.agent_secret = Some(AGENT_SECRET.to_owned());
    let mut impostor = edge_agent::PollClient::new(&token, options).unwrap();
    assert!(impostor.checkin().await.is_err());
    let _ = cp.docker_get(id, "/_ping").await;
    eventually(Duration::from_secs(15), "tunnel open", || async {
        (cp.tunnel(id).await.0 == "open").then_some(())
    })
    .await;
    assert!(agent.stop().await);
    cp.stop().await;

    let text = String::from_utf8_lossy(&lines.0.lock()).into_owned();
    // The capture works: the binding was logged, and the Edge ID at debug.
    assert!(text.contains("edge id bound on first check-in"), "{text}");
    let edge = edge_id.to_string();
    assert!(
        text.lines()
            .any(|l| l.contains(" DEBUG ") && l.contains(&edge)),
        "no debug line with the edge id"
    );
    let secret: String = token
        .secret
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for line in text.lines() {
        for (what, value) in [
            ("join key", key.as_str()),
            ("join secret", secret.as_str()),
            ("admin key", ADMIN_KEY),
            ("agent secret", AGENT_SECRET),
        ] {
            assert!(!line.contains(value), "the {what} is logged: {line}");
        }
        if [" INFO ", " WARN ", " ERROR "]
            .iter()
            .any(|l| line.contains(l))
        {
            assert!(
                !line.contains(&edge),
                "the edge id is logged above debug: {line}"
            );
        }
    }
}
