//! bh admin: what only an admin token may do. `bh admin backup` saves a
//! consistent copy of the server's database, like `etcdctl snapshot save`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::Digest as _;
use tokio_stream::StreamExt as _;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::backup_database_response::Part;

use crate::client::{CliError, Client};
use crate::output::{Format, print_structured};

/// `bh admin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Save a consistent copy of the server's database to OUT_FILE, written
    /// atomically; restore it with `boilerhoused restore --from OUT_FILE`
    /// while the server is stopped.
    Backup {
        /// Where to write the backup.
        out_file: PathBuf,
    },
}

#[derive(Serialize)]
struct BackupView {
    file: String,
    database: String,
    bytes: u64,
    taken_at: String,
    integrity: String,
    sha256: String,
}

/// The file being written beside `out`, renamed over it once complete.
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::Input(format!("cannot {what} {}: {e}", path.display()))
}

impl Client {
    pub async fn admin(&self, command: AdminCommand, format: Format) -> Result<(), CliError> {
        match command {
            AdminCommand::Backup { out_file } => self.admin_backup(&out_file, format).await,
        }
    }

    async fn admin_backup(&self, out: &Path, format: Format) -> Result<(), CliError> {
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = out
            .file_name()
            .ok_or_else(|| CliError::Input(format!("{} names no file", out.display())))?;
        let partial = Partial(dir.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        )));
        let mut stream = pb::admin_service_client::AdminServiceClient::new(self.channel())
            .backup_database(pb::BackupDatabaseRequest {})
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        // Created once the server has answered, so a refusal leaves nothing.
        let mut file = None;
        let mut info = None;
        let mut hash = sha2::Sha256::new();
        let mut written = 0u64;
        let mut sent_sha = None;
        while let Some(message) = stream.next().await {
            match message.map_err(|s| self.fail(s))?.part {
                Some(Part::Info(i)) => info = Some(i),
                Some(Part::Chunk(bytes)) => {
                    if file.is_none() {
                        let created = std::fs::File::create(&partial.0)
                            .map_err(|e| io("create", &partial.0, e))?;
                        file = Some(created);
                    }
                    let Some(f) = file.as_mut() else { continue };
                    hash.update(&bytes);
                    written += bytes.len() as u64;
                    f.write_all(&bytes)
                        .map_err(|e| io("write", &partial.0, e))?;
                }
                Some(Part::Sha256(sha)) => sent_sha = Some(sha),
                None => {}
            }
        }
        let info = info.ok_or_else(|| CliError::Server("the server sent no backup".into()))?;
        let sha = hex_digest(hash);
        // A stream cut short (a server stopping, a dropped connection) must
        // never be mistaken for a backup.
        if sent_sha.as_deref() != Some(sha.as_str()) || written != info.size_bytes {
            return Err(CliError::Server(format!(
                "the backup arrived incomplete ({written} of {} bytes, checksum {}); nothing was written to {}",
                info.size_bytes,
                if sent_sha.is_some() {
                    "differs"
                } else {
                    "missing"
                },
                out.display()
            )));
        }
        let file = file.ok_or_else(|| CliError::Server("the backup was empty".into()))?;
        file.sync_all().map_err(|e| io("sync", &partial.0, e))?;
        drop(file);
        std::fs::rename(&partial.0, out).map_err(|e| io("rename into", out, e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", &dir, e))?;
        let view = BackupView {
            file: out.display().to_string(),
            database: info.database_path.clone(),
            bytes: written,
            taken_at: crate::output::time(info.taken_at.as_ref()),
            integrity: info.integrity.clone(),
            sha256: sha,
        };
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!(
            "backup of {} written to {}: {} ({} bytes), integrity {} (PRAGMA integrity_check of the copy), sha256 {} verified",
            view.database,
            view.file,
            boilerhouse_core::units::format_size(view.bytes),
            view.bytes,
            view.integrity,
            view.sha256
        );
        Ok(())
    }
}

fn hex_digest(hash: sha2::Sha256) -> String {
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
