//! What the executor remembers of commands: results by id, so a command
//! the server resends is answered, not run twice; the ones in flight; and
//! the containers Creates are making.

use std::collections::{BTreeMap, HashSet, VecDeque};

use boilerhouse_core::ContainerId;

use super::{Executor, Outcome};

/// How many command results are remembered for duplicate ids.
const REMEMBERED: usize = 4096;

#[derive(Default)]
pub(super) struct Memory {
    results: BTreeMap<String, Outcome>,
    order: VecDeque<String>,
    in_flight: HashSet<String>,
    /// Containers an admitted Create is making, until the session has taken
    /// its result: their engine events need no full report, since the
    /// result tells the server about them.
    creating: HashSet<ContainerId>,
}

/// What to do with an incoming command id.
pub enum Admission {
    /// New: execute it.
    Run,
    /// Done before: here is the answer.
    Answered(Outcome),
    /// Being executed right now: its answer will follow.
    InFlight,
}

impl Executor {
    /// Decides whether `command_id` must run, and marks it in flight if so.
    pub fn admit(&self, command_id: &str) -> Admission {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outcome) = memory.results.get(command_id) {
            return Admission::Answered(outcome.clone());
        }
        if !memory.in_flight.insert(command_id.to_owned()) {
            return Admission::InFlight;
        }
        Admission::Run
    }

    /// Records the outcome of an admitted command.
    pub fn finish(&self, command_id: &str, outcome: &Outcome) {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.in_flight.remove(command_id);
        memory
            .results
            .insert(command_id.to_owned(), outcome.clone());
        memory.order.push_back(command_id.to_owned());
        while memory.order.len() > REMEMBERED {
            if let Some(old) = memory.order.pop_front() {
                memory.results.remove(&old);
            }
        }
    }

    /// Whether `id` is being made by a Create whose result the session has
    /// not taken yet (see [`Executor::created`]).
    pub fn creating(&self, id: &ContainerId) -> bool {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.creating.contains(id)
    }

    /// A Create begins making `id`.
    pub(super) fn begin_create(&self, id: ContainerId) {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.creating.insert(id);
    }

    /// The session took the result of the Create that made `id`, or will
    /// never take it.
    pub fn created(&self, id: &ContainerId) {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.creating.remove(id);
    }
}
