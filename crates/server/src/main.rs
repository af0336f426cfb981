//! boilerhoused entry point: configuration, logging, listeners, signals.

use clap::Parser as _;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use boilerhouse_server::config::{Args, Config, LogFormat};
use boilerhouse_server::database::{REFUSED_EXIT, Refused};

/// jemalloc, as most long-running Rust servers use: with glibc's malloc
/// the server at 100,000 containers held 816 MiB, ~200 MiB of it freed
/// memory kept in per-thread arenas; with jemalloc, 522 MiB
/// (docs/BENCHMARKS.md, P5). Its settings are compiled in from
/// `.cargo/config.toml` (JEMALLOC_SYS_WITH_MALLOC_CONF).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("./data"));
        let database = args.database.clone();
        return match boilerhouse_server::admin_cli::run(command, &data_dir, database.as_deref())
            .await
        {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("boilerhoused: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("boilerhoused: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let grpc = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.listen, error = %e, "cannot listen for gRPC");
            return std::process::ExitCode::FAILURE;
        }
    };
    let metrics = match TcpListener::bind(config.metrics_listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.metrics_listen, error = %e, "cannot listen for metrics");
            return std::process::ExitCode::FAILURE;
        }
    };
    let database = config.database.clone();
    match boilerhouse_server::leadership::run(config, grpc, metrics, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(ref e) if let Some(refused) = e.downcast_ref::<Refused>() => refuse(refused),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "boilerhoused failed");
            match boilerhouse_server::database::damage_behind_failure(&database).await {
                Some(refused) => refuse(&refused),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// One sentence an operator can act on, on standard error as a bad
/// configuration is; SQLite's words, if any, below it.
fn refuse(refused: &Refused) -> std::process::ExitCode {
    eprintln!("boilerhoused: {}", refused.sentence);
    if let Some(detail) = &refused.detail {
        eprintln!("  detail: {detail}");
    }
    std::process::ExitCode::from(REFUSED_EXIT)
}
