//! `edge-agent`: parses flags and environment variables, then runs the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = edge_agent::Args::parse();
    let config = match edge_agent::Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    edge_agent::init_tracing();
    // One thread: an agent does a few requests a minute, and its memory goal is <= 8 MB.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(edge_agent::run(config, edge_agent::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
