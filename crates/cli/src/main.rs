//! bh: the Boilerhouse operator CLI. A gRPC client of boilerhoused and
//! nothing else: every command is one or two RPCs, so anything bh does,
//! grpcurl or any other client can do too.

// First: its `out!` and `out_text!` are used by every module after it.
#[macro_use]
mod output;
mod admin;
mod affinity;
mod boosts;
mod client;
mod events;
mod failover;
mod pools;
mod reconcile;
mod syncs;
mod workloads;

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
    /// Address of boilerhoused; several (comma-separated or repeated) for
    /// replicas, of which bh finds the leader.
    #[arg(
        long,
        global = true,
        env = "BOILERHOUSE_ADDR",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:7600"
    )]
    server: Vec<String>,
    /// Bearer token to present (admin, operator or tenant:<id> scope).
    #[arg(long, global = true, env = "BOILERHOUSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify an https:// server against.
    #[arg(long, global = true, env = "BOILERHOUSE_CA")]
    ca: Option<std::path::PathBuf>,
    /// The name every server's certificate carries, if not the host in
    /// --server.
    #[arg(long, global = true, env = "BOILERHOUSE_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
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
    /// Warm pools, one per workload.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Claim a running container of a workload for a tenant.
    Claim {
        /// Tenant id.
        tenant: String,
        /// Workload id.
        workload: String,
        /// How long a cold start may take, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Idempotency key: a retry with the same key gets the same answer.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Release a tenant's claim; the container is kept for the tenant for
    /// the workload's affinity_timeout.
    Release {
        /// Tenant id.
        tenant: String,
        /// Workload id.
        workload: String,
        /// The claim's generation; defaults to the current one.
        #[arg(long)]
        generation: Option<u64>,
    },
    /// Active claims.
    #[command(subcommand)]
    Claims(ClaimsCommand),
    /// Affinity reservations.
    #[command(subcommand)]
    Affinity(AffinityCommand),
    /// Managed containers.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Resource boosts: time-boxed extra CPU, memory or GPU.
    #[command(subcommand)]
    Boost(BoostCommand),
    /// Tenant state sync: status and manual runs.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Compare the database with what agents report.
    #[command(subcommand)]
    Reconcile(ReconcileCommand),
    /// The activity log.
    Events(EventsArgs),
    /// Server health and background tasks.
    Status,
    /// Admin-only: backups of the server's database.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum SyncCommand {
    /// Where each (tenant, workload, mapping) sync stands.
    #[command(alias = "ls")]
    Status {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
    },
    /// Sync a tenant's container now and wait for it.
    Trigger {
        /// Tenant id.
        tenant: String,
        /// Workload id.
        workload: String,
        /// upload, download or bidirectional; default: each mapping's own.
        #[arg(long)]
        direction: Option<String>,
    },
    /// Stream status changes, starting with the current statuses.
    Watch {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum BoostCommand {
    /// Grant extra CPU, memory or GPU for a while; prints the boost id.
    ///
    /// TARGET is node/NAME (or a bare node name), container/ID (or a bare
    /// container id) or tenant/TENANT/WORKLOAD. AMOUNT is cores for cpu
    /// (2, 1.5, 500m), a size for memory (512M, 2G) and whole GPUs.
    Request {
        /// What to raise.
        target: String,
        /// cpu, memory or gpu.
        resource: String,
        /// How much.
        #[arg(allow_hyphen_values = true)]
        amount: String,
        /// low, normal, high or critical; higher preempts lower when
        /// capacity is short.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// How long the boost lasts once in force.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// The node to draw capacity from; chosen when omitted.
        #[arg(long)]
        source: Option<String>,
        /// Idempotency key: a retry with the same key gets the same boost.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Live boosts, with the time each has left.
    #[command(alias = "list", alias = "ls")]
    Status {
        /// Only boosts drawing from or raising this node.
        #[arg(long)]
        node: Option<String>,
        /// Include released, expired, preempted and failed boosts.
        #[arg(long)]
        all: bool,
    },
    /// Show one boost.
    Get {
        /// Boost id.
        id: String,
    },
    /// End a boost now and restore what it raised.
    Release {
        /// Boost id.
        id: String,
        /// Idempotency key.
        #[arg(long)]
        request_id: Option<String>,
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
    /// Cordon a node, upload its tenants' files, release its claims and
    /// remove its containers.
    Drain {
        /// Node name.
        id: String,
        /// Give up waiting after this long (default 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// List pools with their counts.
    #[command(alias = "ls")]
    List,
    /// Show one pool.
    Get {
        /// Pool (workload) id.
        id: String,
    },
    /// Override a pool's sizes (and put a drained pool back in service).
    Scale {
        /// Pool (workload) id.
        id: String,
        /// Idle containers to keep.
        #[arg(long)]
        min: Option<u32>,
        /// Containers in total.
        #[arg(long)]
        max: Option<u32>,
    },
    /// Destroy a pool's idle containers and stop refilling it.
    Drain {
        /// Pool (workload) id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClaimsCommand {
    /// List claims.
    #[command(alias = "ls")]
    List {
        /// Only this workload's.
        #[arg(long)]
        workload: Option<String>,
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// Include released and lost claims.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AffinityCommand {
    /// List reservations.
    #[command(alias = "ls")]
    List,
    /// Keep a reservation longer.
    Extend {
        /// Tenant id.
        tenant: String,
        /// Workload id.
        workload: String,
        /// How much longer, e.g. 10m.
        #[arg(long = "by", value_parser = humantime::parse_duration)]
        by: std::time::Duration,
    },
    /// End a reservation now; its container is destroyed.
    Revoke {
        /// Tenant id.
        tenant: String,
        /// Workload id.
        workload: String,
    },
}

#[derive(Debug, Subcommand)]
enum ContainerCommand {
    /// List containers.
    #[command(alias = "ls")]
    List {
        /// Only this workload's.
        #[arg(long)]
        workload: Option<String>,
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show one container.
    Get {
        /// Container id.
        id: String,
    },
    /// Stop and remove a container.
    Destroy {
        /// Container id.
        id: String,
        /// Even if a tenant holds it (the claim becomes LOST).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReconcileCommand {
    /// Show what reconciliation would do now, and why (a dry run).
    Plan {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Carry out every due action now, each recorded in the activity log.
    Apply {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
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
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "bh", &mut script);
        out_text!("{}", String::from_utf8_lossy(&script));
        return Ok(());
    }
    let client = Client::connect(
        &cli.server,
        client::Credentials {
            token: cli.token.as_deref(),
            ca: cli.ca.as_deref(),
            server_name: cli.tls_server_name.as_deref(),
        },
    )?;
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
            NodeCommand::Drain { id, deadline } => client.node_drain(&id, deadline, format).await,
        },
        Command::Pool(cmd) => match cmd {
            PoolCommand::List => client.pool_list(format).await,
            PoolCommand::Get { id } => client.pool_get(&id, format).await,
            PoolCommand::Scale { id, min, max } => client.pool_scale(&id, min, max, format).await,
            PoolCommand::Drain { id } => client.pool_drain(&id, format).await,
        },
        Command::Claim {
            tenant,
            workload,
            timeout,
            request_id,
        } => {
            client
                .claim(
                    &tenant,
                    &workload,
                    timeout,
                    request_id.unwrap_or_default(),
                    format,
                )
                .await
        }
        Command::Release {
            tenant,
            workload,
            generation,
        } => client.release(&tenant, &workload, generation, format).await,
        Command::Claims(ClaimsCommand::List {
            workload,
            tenant,
            all,
        }) => client.claims_list(workload, tenant, all, format).await,
        Command::Affinity(cmd) => match cmd {
            AffinityCommand::List => client.affinity_list(format).await,
            AffinityCommand::Extend {
                tenant,
                workload,
                by,
            } => client.affinity_extend(&tenant, &workload, by, format).await,
            AffinityCommand::Revoke { tenant, workload } => {
                client.affinity_revoke(&tenant, &workload, format).await
            }
        },
        Command::Container(cmd) => match cmd {
            ContainerCommand::List { workload, node } => {
                client.container_list(workload, node, format).await
            }
            ContainerCommand::Get { id } => client.container_get(&id, format).await,
            ContainerCommand::Destroy { id, force } => {
                client.container_destroy(&id, force, format).await
            }
        },
        Command::Boost(cmd) => match cmd {
            BoostCommand::Request {
                target,
                resource,
                amount,
                priority,
                duration,
                source,
                request_id,
            } => {
                client
                    .boost_request(
                        boosts::BoostArgs {
                            target,
                            resource,
                            amount,
                            priority,
                            duration: Some(duration),
                            source,
                            request_id,
                        },
                        format,
                    )
                    .await
            }
            BoostCommand::Status { node, all } => client.boost_status(node, all, format).await,
            BoostCommand::Get { id } => client.boost_get(&id, format).await,
            BoostCommand::Release { id, request_id } => {
                client.boost_release(&id, request_id, format).await
            }
        },
        Command::Sync(cmd) => match cmd {
            SyncCommand::Status { tenant, workload } => {
                client.sync_status(tenant, workload, format).await
            }
            SyncCommand::Trigger {
                tenant,
                workload,
                direction,
            } => {
                client
                    .sync_trigger(&tenant, &workload, direction.as_deref(), format)
                    .await
            }
            SyncCommand::Watch { tenant, workload } => {
                client.sync_watch(tenant, workload, format).await
            }
        },
        Command::Reconcile(ReconcileCommand::Plan { node }) => {
            client.reconcile_plan(node, format).await
        }
        Command::Reconcile(ReconcileCommand::Apply { node }) => {
            client.reconcile_apply(node, format).await
        }
        Command::Events(args) => client.events(args, format).await,
        Command::Status => client.status(format).await,
        Command::Admin(cmd) => client.admin(cmd, format).await,
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
