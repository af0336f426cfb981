//! A consistent copy of the live database, for `bh admin backup`.

use std::path::Path;

use super::{Store, StoreError};

impl Store {
    /// Writes a consistent, compacted copy of the database to `target`
    /// (which must not exist) with `VACUUM INTO`. It runs on a read
    /// connection: the copy is the snapshot of one read transaction, and
    /// writers are never held up (in WAL mode a reader blocks nobody; the
    /// checkpointer just cannot pass it until it ends).
    pub async fn vacuum_into(&self, target: &Path) -> Result<(), StoreError> {
        let target = target
            .to_str()
            .ok_or_else(|| StoreError::Internal(format!("{} is not UTF-8", target.display())))?
            .to_owned();
        super::sql::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.reads)
            .await?;
        Ok(())
    }
}
