//! The real `edge-agent` binary refuses bad configuration with one clear line and exit code 2.

use std::process::Command;

fn run(env: &[(&str, &str)]) -> (i32, String) {
    let data = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .env_clear()
        .env("EDGE_DATA_DIR", data.path())
        .envs(env.iter().copied())
        .output()
        .expect("run edge-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_keys_end_with_one_clear_line() {
    let four_fields = "aHR0cHM6Ly94fGg6MXxhYnwz"; // base64 of "https://x|h:1|ab|3"
    let cases = [
        (
            "not base64!",
            "invalid EDGE_KEY: join token is not valid base64",
        ),
        (
            four_fields,
            "invalid EDGE_KEY: join token has 4 '|'-separated fields, expected 5",
        ),
        ("", "EDGE_KEY is required"),
    ];
    for (key, want) in cases {
        let (code, stderr) = run(&[("EDGE_KEY", key)]);
        assert_eq!(code, 2, "EDGE_KEY={key:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line for {key:?}: {stderr}");
        assert!(stderr.starts_with("edge-agent: "), "{stderr}");
        assert!(stderr.contains(want), "EDGE_KEY={key:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn malformed_edge_id_is_refused() {
    let token = proto::JoinToken {
        api_url: "https://127.0.0.1:9".into(),
        tunnel_addr: "127.0.0.1:8000".into(),
        tunnel_fingerprint: [1; 32],
        endpoint_id: 1,
        secret: proto::token::JoinSecret::generate(),
    }
    .encode();
    let (code, stderr) = run(&[("EDGE_KEY", &token), ("EDGE_ID", "not-a-uuid")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid EDGE_ID"), "{stderr}");
    // The key itself never shows up in errors.
    assert!(!stderr.contains(&token), "{stderr}");
}
