//! boilerhouse-agent: runs on each Docker host, connects to boilerhoused
//! over `AgentService.Connect` and reports what really runs.
//!
//! The agent protocol is the next capability to land; until then this
//! binary refuses to start rather than pretend to manage a host.

use clap::Parser;

/// Run the Boilerhouse agent on a Docker host.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of boilerhoused.
    #[arg(
        long,
        env = "BOILERHOUSE_ADDR",
        default_value = "http://127.0.0.1:7600"
    )]
    server: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!(
        "boilerhouse-agent: the agent protocol is not implemented in this version; \
         nothing was started (server {})",
        args.server
    );
    std::process::ExitCode::FAILURE
}
