//! AdminService: a consistent copy of the database for `bh admin backup`,
//! like `etcdctl snapshot save`. The copy is made beside the database
//! (same disk, so no surprise about a full /tmp), checked, streamed, and
//! removed when the stream ends however it ends.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_proto::convert::timestamp_to_pb;
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::admin_service_server::AdminService;
use boilerhouse_proto::pb::backup_database_response::Part;

use super::AppState;
use crate::database::{PG_DUMP_RECIPE, files};
use crate::error::ApiError;
use crate::store::DatabaseLocation;
use crate::store::integrity::{self, Verdict};

/// AdminService.
pub struct Admin(pub AppState);

/// Bytes per message: well under gRPC's 4 MiB default message limit.
const CHUNK: usize = 1 << 20;

type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupDatabaseResponse, Status>> + Send>>;

/// A file removed when dropped: the copy never outlives its stream.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The name of a copy in progress: `<db>.backup-<uuid>.tmp`.
pub fn scratch_path(db: &Path) -> PathBuf {
    files::sidecar(db, &format!(".backup-{}.tmp", uuid::Uuid::now_v7()))
}

#[tonic::async_trait]
impl AdminService for Admin {
    type BackupDatabaseStream = BackupStream;

    async fn backup_database(
        &self,
        _request: Request<pb::BackupDatabaseRequest>,
    ) -> Result<Response<Self::BackupDatabaseStream>, Status> {
        let store = &self.0.store;
        let db = match store.location() {
            DatabaseLocation::Sqlite(path) => path.clone(),
            DatabaseLocation::Postgres(_) => {
                return Err(Status::failed_precondition(PG_DUMP_RECIPE));
            }
        };
        let copy = Scratch(scratch_path(&db));
        let taken_at = crate::clock::now();
        store.vacuum_into(&copy.0).await.map_err(ApiError::from)?;
        let integrity = match integrity::check_file(&copy.0, integrity::Depth::Full).await {
            Ok(Verdict::Sound) => "ok".to_owned(),
            Ok(Verdict::Damaged { summary, detail }) => format!("{summary}: {detail}"),
            Ok(other) => format!("{other:?}"),
            Err(e) => return Err(ApiError::Internal(e.to_string()).into()),
        };
        if integrity != "ok" {
            // A copy that fails the check is no backup; the live database
            // it came from is likely damaged too.
            return Err(Status::data_loss(format!(
                "the copy of {} fails SQLite's integrity check ({integrity}); the database itself may be damaged: see docs/OPERATIONS.md, \"A missing or damaged database\"",
                db.display()
            )));
        }
        let size = std::fs::metadata(&copy.0)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", copy.0.display())))?
            .len();
        store
            .append_event(
                NewEvent::new(
                    taken_at,
                    EventKind::DatabaseBackedUp,
                    format!(
                        "a copy of the database {} was taken for a backup ({size} bytes, integrity ok)",
                        db.display()
                    ),
                )
                .with_attribute("bytes", size.to_string()),
            )
            .await
            .map_err(ApiError::from)?;
        let info = pb::BackupInfo {
            backend: "sqlite".into(),
            database_path: db.display().to_string(),
            size_bytes: size,
            taken_at: Some(timestamp_to_pb(taken_at)),
            integrity,
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(e) = send_copy(copy, info, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Streams `copy`: its info, its bytes, then their SHA-256. Ends quietly
/// when the client goes away; the copy is removed either way.
async fn send_copy(
    copy: Scratch,
    info: pb::BackupInfo,
    tx: &mpsc::Sender<Result<pb::BackupDatabaseResponse, Status>>,
) -> Result<(), Status> {
    let message = |part| Ok(pb::BackupDatabaseResponse { part: Some(part) });
    if tx.send(message(Part::Info(info))).await.is_err() {
        return Ok(());
    }
    let mut file = tokio::fs::File::open(&copy.0)
        .await
        .map_err(|e| Status::internal(format!("reading the copy: {e}")))?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Status::internal(format!("reading the copy: {e}")))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        if tx
            .send(message(Part::Chunk(buf[..n].to_vec())))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    let _ = tx
        .send(message(Part::Sha256(hex::encode(hash.finalize()))))
        .await;
    Ok(())
}
