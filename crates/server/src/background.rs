//! One low-priority thread for the server's long synchronous passes.
//!
//! A few periodic passes are pure CPU over every container: the boost
//! pass comparing limits (20-90 ms at 60,000 containers) and the
//! reconciliation planner (100 ms and more). On a tokio worker they held
//! that worker; on the blocking pool they still took a core from the
//! threads every claim needs, the store's writer first of all, as an
//! equal, and on a small machine claims waited tens of milliseconds
//! behind them. Here they run one after another on a thread with a
//! higher nice value, so the kernel gives the claim path the cores first
//! and these passes what is left; they still run at full speed on an
//! idle machine. (neon's pageserver keeps its background work on runtimes
//! of its own for the same reason.)
//!
//! A job that takes a lock claims need (the pool index) must hold it only
//! for moments, as [`crate::pools::Pools::scan`] does (it takes each
//! slice's records and lets go before looking at them): a low-priority
//! holder may wait for a core while a claim waits for the lock.
//!
//! A job may spawn tasks (they run on the caller's runtime) but must not
//! call `spawn_blocking`: a blocking-pool thread started from here would
//! keep this thread's nice value for whatever it runs later.
//!
//! Unlike `spawn_blocking`, a job here does not stop a paused tokio clock
//! (`tokio::time::pause`) from advancing while the caller waits: a test
//! on paused time that runs these passes may see its timers jump.

use std::any::Any;
use std::sync::OnceLock;
use std::sync::mpsc;

/// How much nicer than the server the background thread is: well below
/// the claim path (weight 110 against 1,024 at nice 0 against 10), never
/// starved outright.
const NICER_BY: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

fn sender() -> &'static mpsc::Sender<Job> {
    static SENDER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SENDER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("background".into())
            .spawn(move || {
                lower_priority(NICER_BY);
                // Ends when the process does: the sender is never dropped.
                for job in rx {
                    job();
                }
            })
            .expect("spawning the background thread");
        tx
    })
}

/// Raises the calling thread's nice value by `by`, relative to what the
/// thread started with (a server run under `nice` keeps its background
/// below itself), and at most to 19.
fn lower_priority(by: i32) {
    let me = Some(rustix::thread::gettid());
    let result = rustix::process::getpriority_process(me)
        .and_then(|now| rustix::process::setpriority_process(me, (now + by).min(19)));
    if let Err(e) = result {
        // Not fatal: the work then shares the cores as an equal, as before.
        let name = std::thread::current().name().map(str::to_owned);
        tracing::warn!(error = %e, thread = ?name, "cannot lower a background thread's priority");
    }
}

/// Runs one long job `f` on a thread of its own, as niced as the
/// background thread, and waits for it without holding a worker: for work
/// of seconds that must not hold up the passes of the background thread
/// (a restart's first reconciliation above all) nor take a core from the
/// claim path as an equal; on an idle machine it still runs at full
/// speed. Not niced further: such a job may hold a lock the claim path
/// needs (SQLite's page cache has one mutex for the whole process), and a
/// holder at the lowest priority could wait long for a core while the
/// writer waits for it. `None` if `f` panicked (the panic is printed by
/// the panic hook, to standard error) or the thread could not start
/// (said in the log).
pub async fn run_alone<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel::<T>();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_priority(NICER_BY);
            // The caller may have gone (its task was dropped): nothing to tell.
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::error!(thread = name, error = %e, "cannot start a background thread");
        return None;
    }
    // A panic drops the sender: the thread's panic message is in the log.
    rx.await.ok()
}

/// Runs `f` on the background thread and waits for it without holding a
/// worker. `f` runs inside the caller's runtime, so it may spawn tasks
/// (the boost pass does, for each container to correct). A panic in `f`
/// is raised again here, in the caller.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, Box<dyn Any + Send>>>();
    let runtime = tokio::runtime::Handle::current();
    let job: Job = Box::new(move || {
        let _inside = runtime.enter();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // The caller may have gone (its task was dropped): nothing to tell.
        let _ = tx.send(result);
    });
    sender()
        .send(job)
        .expect("the background thread ends only with the process");
    match rx.await {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("a job always answers: its panic is caught"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_runs_on_the_niced_thread_and_its_panic_reaches_the_caller() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            .expect("getpriority");
        let (name, nice) = run(|| {
            (
                std::thread::current().name().map(str::to_owned),
                rustix::process::getpriority_process(Some(rustix::thread::gettid())),
            )
        })
        .await;
        assert_eq!(name.as_deref(), Some("background"));
        // Root or not, raising one's own nice value is always allowed.
        // (The thread starts from its creator's value, this test's.)
        assert_eq!(nice.expect("getpriority"), (mine + NICER_BY).min(19));

        // A job may spawn onto the caller's runtime.
        let spawned = run(|| tokio::spawn(async { 6 * 7 })).await;
        assert_eq!(spawned.await.expect("the spawned task"), 42);

        let caller = tokio::spawn(run(|| -> u32 { panic!("a failing pass") }));
        let panic = caller
            .await
            .expect_err("the job's panic reaches its caller");
        assert!(panic.is_panic());
        // The thread survives a job's panic and runs the next one.
        assert_eq!(run(|| 7).await, 7);
    }

    #[tokio::test]
    async fn a_long_job_runs_on_a_thread_of_its_own_niced_like_the_background() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            .expect("getpriority");
        let (name, nice) = run_alone("whole-check", || {
            (
                std::thread::current().name().map(str::to_owned),
                rustix::process::getpriority_process(Some(rustix::thread::gettid())),
            )
        })
        .await
        .expect("the job answers");
        assert_eq!(name.as_deref(), Some("whole-check"));
        assert_eq!(nice.expect("getpriority"), (mine + NICER_BY).min(19));

        let panicked = run_alone("failing", || -> u32 { panic!("a failing job") }).await;
        assert_eq!(panicked, None);
    }
}
