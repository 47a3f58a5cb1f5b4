//! `loadtest`: parses flags, runs the library, prints the report.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = loadtest::cli::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The agents' insecure-certificate warning concerns the admin client here, on purpose.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,edge_agent::tls=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(spec) = &args.worker_spec {
        return match runtime.block_on(loadtest::worker::run_worker(spec)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadtest worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let report = match runtime.block_on(loadtest::run(args.clone())) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.human());
    let json = match serde_json::to_string_pretty(&report) {
        Ok(json) => json,
        Err(e) => {
            eprintln!("loadtest: cannot serialize the report: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &args.report {
        Some(path) => {
            if let Err(e) = std::fs::write(path, json + "\n") {
                eprintln!("loadtest: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("report written to {}", path.display());
        }
        None => println!("{json}"),
    }
    ExitCode::SUCCESS
}
