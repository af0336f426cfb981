//! bh: the Boilerhouse operator CLI. A gRPC client of boilerhoused and
//! nothing else: every command is one or two RPCs, so anything bh does,
//! grpcurl or any other client can do too.

mod client;
mod output;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

use client::{CliError, Client};
use output::Format;

/// Operate a Boilerhouse control plane.
#[derive(Debug, Parser)]
#[command(name = "bh", version, about, propagate_version = true)]
struct Cli {
    /// Address of boilerhoused.
    #[arg(
        long,
        global = true,
        env = "BOILERHOUSE_ADDR",
        default_value = "http://127.0.0.1:7600"
    )]
    server: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Workloads: the YAML files that define containers and their pools.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Docker hosts and their agents.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The activity log.
    Events(EventsArgs),
    /// Server health and background tasks.
    Status,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum WorkloadCommand {
    /// List workloads, and files that failed to load.
    #[command(alias = "ls")]
    List,
    /// Show one workload.
    Get {
        /// Workload id.
        id: String,
    },
    /// Validate a workload file and write it into the server's workload
    /// directory.
    Apply {
        /// The YAML file; `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate only.
        #[arg(long)]
        dry_run: bool,
        /// Idempotency key: a retry with the same key is answered once.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Delete a workload's file; its pool drains.
    #[command(alias = "rm")]
    Delete {
        /// Workload id.
        id: String,
        /// Idempotency key.
        #[arg(long)]
        request_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List nodes.
    #[command(alias = "ls")]
    List,
    /// Show one node.
    Get {
        /// Node name.
        id: String,
    },
    /// Keep new containers off a node.
    Cordon {
        /// Node name.
        id: String,
    },
    /// Allow new containers on a node again.
    Uncordon {
        /// Node name.
        id: String,
    },
}

/// Show the activity log.
#[derive(Debug, clap::Args)]
struct EventsArgs {
    /// Keep watching for new events.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only these kinds; a trailing '.' matches a prefix (`node.`).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// Only events about this workload.
    #[arg(long)]
    workload: Option<String>,
    /// Only events about this node.
    #[arg(long)]
    node: Option<String>,
    /// Only events about this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only events about this container.
    #[arg(long)]
    container: Option<String>,
    /// Least severity: info, warning or error.
    #[arg(long)]
    severity: Option<String>,
    /// Show this many of the latest events first.
    #[arg(short = 'n', long, default_value_t = 50)]
    limit: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bh: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let format = cli.output;
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "bh", &mut std::io::stdout());
        return Ok(());
    }
    let client = Client::connect(&cli.server).await?;
    match cli.command {
        Command::Workload(cmd) => match cmd {
            WorkloadCommand::List => client.workload_list(format).await,
            WorkloadCommand::Get { id } => client.workload_get(&id, format).await,
            WorkloadCommand::Apply {
                file,
                dry_run,
                request_id,
            } => {
                let yaml = read_input(&file)?;
                client
                    .workload_apply(yaml, dry_run, request_id.unwrap_or_default(), format)
                    .await
            }
            WorkloadCommand::Delete { id, request_id } => {
                client
                    .workload_delete(&id, request_id.unwrap_or_default(), format)
                    .await
            }
        },
        Command::Node(cmd) => match cmd {
            NodeCommand::List => client.node_list(format).await,
            NodeCommand::Get { id } => client.node_get(&id, format).await,
            NodeCommand::Cordon { id } => client.node_cordon(&id, true, format).await,
            NodeCommand::Uncordon { id } => client.node_cordon(&id, false, format).await,
        },
        Command::Events(args) => client.events(args, format).await,
        Command::Status => client.status(format).await,
        Command::Completions { .. } => Ok(()),
    }
}

fn read_input(path: &std::path::Path) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        if std::io::stdin().is_terminal() {
            eprintln!("bh: reading the workload from standard input (end with Ctrl-D)");
        }
        return std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::Input(format!("cannot read standard input: {e}")));
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))
}
