//! The binary as an operator meets it first: `--help`, and a start that cannot succeed ends in
//! one clear line. (Also makes `cargo test` build this binary, which the cluster tests of
//! `testkit` run.) No dev-dependencies: the gateway's dependency tree stays its own.

use std::process::Command;

#[test]
fn help_names_the_contract_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-gateway"))
        .arg("--help")
        .output()
        .expect("run tunnel-gateway --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--redis-url",
        "--tls-cert",
        "--tls-key",
        "--metrics-addr",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn a_missing_certificate_is_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-gateway"))
        .args(["--redis-url", "redis://127.0.0.1:1/"])
        .args(["--tls-cert", "/nonexistent/cert.pem"])
        .args(["--tls-key", "/nonexistent/key.pem"])
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .output()
        .expect("run tunnel-gateway");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tunnel-gateway: tls: cannot read /nonexistent/cert.pem"),
        "{err}"
    );
}
