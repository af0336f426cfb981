//! boilerhouse-store-load: drives acknowledged writes into a store as fast
//! as it can and prints `ack <event-id> <marker>` for each one the moment
//! it is acknowledged. The crash test kill -9s it mid-load and checks that
//! every printed id survived; operators can use it to gauge a disk.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_server::store::{DatabaseLocation, Store, StoreOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let database = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: boilerhouse-store-load <db-path|postgres://…> [writers]")
    })?;
    let location = DatabaseLocation::parse(&database).map_err(|e| anyhow::anyhow!(e))?;
    let writers: u64 = args.next().map(|w| w.parse()).transpose()?.unwrap_or(32);
    let store = Store::open(location, StoreOptions::default()).await?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let marker = format!("w{writer}-{n}");
                let event = NewEvent::new(
                    Timestamp::from_millis(1),
                    EventKind::NodeJoined,
                    marker.clone(),
                );
                let recorded = store.append_event(event).await?;
                let mut out = out
                    .lock()
                    .map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
                writeln!(out, "ack {} {marker}", recorded.id)?;
                out.flush()?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
