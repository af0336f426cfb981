//! boilerhouse-agent entry point.

use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use boilerhouse_agent::config::{AgentConfig, Args};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let json = args.log_json;
    let mut config = match AgentConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("boilerhouse-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = config.policy.prepare() {
        eprintln!("boilerhouse-agent: {e}");
        return std::process::ExitCode::from(2);
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping; containers keep running");
        signal.cancel();
    });

    tracing::info!(node = %config.node_id, servers = %config.servers.join(","), state_root = %config.state_root.display(), "boilerhouse-agent starting");
    match boilerhouse_agent::session::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "boilerhouse-agent failed");
            std::process::ExitCode::FAILURE
        }
    }
}
