//! `boilerhoused pki …` and `boilerhoused token …`: making the credentials
//! a secure installation needs, before the server first starts; and
//! `boilerhoused restore`, which puts a backup in place while no server
//! runs.

use std::path::{Path, PathBuf};

use crate::store::DatabaseLocation;

use clap::Subcommand;

use boilerhouse_core::NodeId;
use boilerhouse_core::auth::Scope;

use crate::auth::pki::{self, PkiDir};

/// What to do instead of serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The installation's CA and certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Bearer tokens for callers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Install a backup (`bh admin backup` makes them) as the database,
    /// with the server stopped: the backup is checked first, a running
    /// server is refused, and the current file is moved aside, not
    /// deleted. Like pki and token, it reads --data-dir and --database,
    /// never the config file.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The database to replace; defaults to the server's --database,
        /// else <data-dir>/boilerhouse.db.
        #[arg(long)]
        database: Option<PathBuf>,
    },
}

/// `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Creates what is missing of the CA, the server certificate and the
    /// named nodes' certificates; keeps what exists.
    Init {
        /// The PKI directory; defaults to <data-dir>/pki.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Another name or IP address the server is reached at; repeatable.
        /// localhost, 127.0.0.1 and ::1 are always included.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// A node to issue an agent certificate for; repeatable.
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
    /// Issues an agent certificate for one node (nodes/<name>.pem, .key).
    Node {
        /// The node's name, as the agent will report it.
        name: String,
        /// The PKI directory; defaults to <data-dir>/pki.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Makes a token, records its digest in the token file, and prints the
    /// token once: it is stored nowhere else.
    Create {
        /// A name for the token, recorded in events it causes.
        #[arg(long)]
        name: String,
        /// admin, operator or tenant:<id>.
        #[arg(long, value_parser = Scope::parse)]
        scope: Scope,
        /// The token file; defaults to <data-dir>/tokens.toml.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Also write the token to this file (mode 0600), for scripts.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn node(name: &str) -> anyhow::Result<NodeId> {
    NodeId::new(name).map_err(|e| anyhow::anyhow!("node name {name:?}: {e}"))
}

/// Runs a subcommand; `data_dir` (and the server's `database`, if given)
/// is where defaults point.
pub async fn run(command: Command, data_dir: &Path, database: Option<&str>) -> anyhow::Result<()> {
    match command {
        Command::Restore {
            from,
            database: target,
        } => {
            let db = match (target, database) {
                (Some(path), _) => path,
                (None, Some(value)) => {
                    match DatabaseLocation::parse(value).map_err(anyhow::Error::msg)? {
                        DatabaseLocation::Sqlite(path) => path,
                        DatabaseLocation::Postgres(_) => {
                            anyhow::bail!("{}", crate::database::PG_DUMP_RECIPE)
                        }
                    }
                }
                (None, None) => data_dir.join("boilerhouse.db"),
            };
            let restored = crate::database::restore::restore(&from, &db).await?;
            for moved in &restored.moved_aside {
                eprintln!("moved aside: {}", moved.display());
            }
            println!(
                "restored {} ({} bytes, integrity ok) as {}; start the server",
                from.display(),
                restored.bytes,
                restored.database.display()
            );
        }
        Command::Pki(PkiCommand::Init { dir, sans, nodes }) => {
            let dir = PkiDir(dir.unwrap_or_else(|| data_dir.join("pki")));
            let nodes = nodes
                .iter()
                .map(|n| node(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let issued = pki::init(&dir, &sans, &nodes)?;
            report(&dir.0, &issued);
        }
        Command::Pki(PkiCommand::Node { name, dir }) => {
            let dir = PkiDir(dir.unwrap_or_else(|| data_dir.join("pki")));
            let issued = pki::issue_node(&dir, &node(&name)?)?;
            report(&dir.0, &issued);
        }
        Command::Token(TokenCommand::Create {
            name,
            scope,
            file,
            out,
        }) => {
            let file = file.unwrap_or_else(|| data_dir.join("tokens.toml"));
            let secret = crate::auth::tokens::create_token(&file, &name, &scope)?;
            if let Some(out) = out {
                crate::auth::files::write_private(&out, secret.as_bytes())?;
                eprintln!(
                    "token {name:?} ({scope}) added to {}; written to {}",
                    file.display(),
                    out.display()
                );
            } else {
                eprintln!(
                    "token {name:?} ({scope}) added to {}; it is shown only now:",
                    file.display()
                );
                println!("{secret}");
            }
        }
    }
    Ok(())
}

fn report(dir: &Path, issued: &pki::Issued) {
    for path in &issued.created {
        eprintln!("created {}", path.display());
    }
    if issued.created.is_empty() {
        eprintln!("{}: everything asked for exists already", dir.display());
    }
}
