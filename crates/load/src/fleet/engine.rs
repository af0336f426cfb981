//! One fake host's containers, in memory: what a Docker engine would hold
//! after the server's commands, and the answers a real agent would give.
//! No I/O, so the fleet's thousand hosts cost only their maps.

use std::collections::{BTreeMap, HashMap, VecDeque};

use boilerhouse_core::container::labels::CONTAINER_ID as CONTAINER_ID_LABEL;
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::command::Command as Kind;

/// How many command answers a host remembers, as the real agent does, so a
/// command the server resends after a reconnect is not done twice.
const REMEMBERED: usize = 4096;

/// What a command produced: the answer, and the engine events it caused
/// (sent before the answer, as Docker's events race the agent's reply).
#[derive(Debug)]
pub struct Answer {
    pub result: pb::CommandResult,
    pub events: Vec<pb::ContainerEvent>,
    /// A RequestFullReport: the session sends a report with this id first.
    pub full_report: bool,
}

/// The containers of one fake host, by Docker name (`bh-<container id>`).
#[derive(Debug, Default)]
pub struct Engine {
    containers: BTreeMap<String, pb::ObservedContainer>,
    answered: HashMap<String, pb::CommandResult>,
    order: VecDeque<String>,
}

/// Which command, for the fleet's counts.
pub fn kind_name(command: &pb::Command) -> &'static str {
    match &command.command {
        Some(Kind::Create(_)) => "create",
        Some(Kind::Start(_)) => "start",
        Some(Kind::Stop(_)) => "stop",
        Some(Kind::Remove(_)) => "remove",
        Some(Kind::UpdateResources(_)) => "update_resources",
        Some(Kind::WriteStateFile(_)) => "write_state_file",
        Some(Kind::WriteStateFiles(_)) => "write_state_files",
        Some(Kind::RunSync(_)) => "run_sync",
        Some(Kind::RequestFullReport(_)) => "request_full_report",
        None => "empty",
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every container, as a full report lists them, in the parts a real
    /// agent sends it in.
    pub fn report(
        &self,
        observed_at: prost_types::Timestamp,
        command_id: String,
        part_size: usize,
    ) -> Vec<pb::FullReport> {
        boilerhouse_proto::convert::full_report_parts(
            observed_at,
            self.containers.values().cloned().collect(),
            command_id,
            part_size,
        )
    }

    /// How many run, and what their limits reserve (the heartbeat's usage).
    pub fn usage(&self) -> (pb::Resources, u32) {
        let mut usage = pb::Resources::default();
        let mut count = 0;
        for c in self
            .containers
            .values()
            .filter(|c| c.docker_state == "running")
        {
            count += 1;
            if let Some(l) = &c.limits {
                usage.cpus += l.cpus;
                usage.memory_bytes += l.memory_bytes;
            }
        }
        (usage, count)
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    /// A running container's name and id, the `n`th modulo their number:
    /// where the fleet's simulated tenant activity lands.
    pub fn nth_running(&self, n: usize) -> Option<(String, String)> {
        let running: Vec<_> = self
            .containers
            .values()
            .filter(|c| c.docker_state == "running")
            .collect();
        let c = running.get(n % running.len().max(1))?;
        let id = c
            .labels
            .get(CONTAINER_ID_LABEL)
            .cloned()
            .unwrap_or_default();
        Some((c.docker_id.clone(), id))
    }

    /// Carries out a command, or answers a repeated id from memory.
    pub fn execute(&mut self, command: &pb::Command, now: prost_types::Timestamp) -> Answer {
        if let Some(result) = self.answered.get(&command.command_id) {
            return Answer {
                result: result.clone(),
                events: Vec::new(),
                full_report: false,
            };
        }
        let mut events = Vec::new();
        let mut full_report = false;
        let outcome: Result<Option<pb::ObservedContainer>, String> = match &command.command {
            Some(Kind::Create(create)) => self.create(create, &now, &mut events),
            Some(Kind::Start(s)) => self.start(&s.container_id, &now, &mut events),
            Some(Kind::Stop(s)) => self.stop(&s.container_id, &now, &mut events),
            Some(Kind::Remove(r)) => Ok(self.remove(&r.container_id, &now, &mut events)),
            Some(Kind::UpdateResources(u)) => self.with(&u.container_id, |c| {
                c.limits = u.limits;
            }),
            Some(Kind::WriteStateFile(w)) => self
                .with(&w.container_id, |c| c.state_file = w.state.clone())
                // The real agent answers a state file write without the
                // container: the container itself did not change.
                .map(|_| None),
            Some(Kind::WriteStateFiles(batch)) => self.write_state_files(batch),
            // Nothing to move: the fleet has no files. An empty report is
            // what a sync of empty directories says.
            Some(Kind::RunSync(_)) => Ok(None),
            Some(Kind::RequestFullReport(_)) => {
                full_report = true;
                Ok(None)
            }
            None => Err("an empty command".to_owned()),
        };
        let result = match outcome {
            Ok(container) => pb::CommandResult {
                command_id: command.command_id.clone(),
                ok: true,
                error: String::new(),
                container,
                sync: matches!(command.command, Some(Kind::RunSync(_)))
                    .then(pb::SyncReport::default),
            },
            Err(error) => pb::CommandResult {
                command_id: command.command_id.clone(),
                ok: false,
                error,
                container: None,
                sync: None,
            },
        };
        if !full_report {
            self.remember(result.clone());
        }
        Answer {
            result,
            events,
            full_report,
        }
    }

    fn remember(&mut self, result: pb::CommandResult) {
        if self.order.len() >= REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.answered.remove(&old);
        }
        self.order.push_back(result.command_id.clone());
        self.answered.insert(result.command_id.clone(), result);
    }

    fn create(
        &mut self,
        create: &pb::CreateContainer,
        now: &prost_types::Timestamp,
        events: &mut Vec<pb::ContainerEvent>,
    ) -> Result<Option<pb::ObservedContainer>, String> {
        let spec = create.spec.as_ref().ok_or("a create without a spec")?;
        let name = format!("bh-{}", spec.container_id);
        // A repeated create finds its twin, as the real agent's does.
        if !self.containers.contains_key(&name) {
            // 64 hex digits, random as Docker's are.
            let docker_id: String = (0..4)
                .map(|_| format!("{:016x}", rand::random::<u64>()))
                .collect();
            self.containers.insert(
                name.clone(),
                pb::ObservedContainer {
                    docker_id,
                    name: name.clone(),
                    labels: spec.labels.clone(),
                    docker_state: "created".to_owned(),
                    // Docker says "starting" until a check first passes.
                    health: if spec.healthcheck.is_some() {
                        "starting".to_owned()
                    } else {
                        String::new()
                    },
                    limits: spec.limits,
                    ..Default::default()
                },
            );
        }
        if create.start {
            return self.start(&spec.container_id, now, events);
        }
        Ok(self.containers.get(&name).cloned())
    }

    fn start(
        &mut self,
        container_id: &str,
        now: &prost_types::Timestamp,
        events: &mut Vec<pb::ContainerEvent>,
    ) -> Result<Option<pb::ObservedContainer>, String> {
        let c = self
            .containers
            .get_mut(&format!("bh-{container_id}"))
            .ok_or_else(|| format!("not found: bh-{container_id}"))?;
        if c.docker_state != "running" {
            c.docker_state = "running".to_owned();
            c.started_at = Some(*now);
            c.exit_code = 0;
            events.push(event(pb::ContainerEventKind::Start, c, now));
            // Every fake container passes its healthcheck at once.
            if c.health == "starting" {
                c.health = "healthy".to_owned();
                events.push(event(pb::ContainerEventKind::Health, c, now));
            }
        }
        Ok(Some(c.clone()))
    }

    fn stop(
        &mut self,
        container_id: &str,
        now: &prost_types::Timestamp,
        events: &mut Vec<pb::ContainerEvent>,
    ) -> Result<Option<pb::ObservedContainer>, String> {
        let Some(c) = self.containers.get_mut(&format!("bh-{container_id}")) else {
            // Stopping a missing container succeeds, as with the agent.
            return Ok(None);
        };
        if c.docker_state == "running" {
            c.docker_state = "exited".to_owned();
            c.exit_code = 137;
            if !c.health.is_empty() {
                c.health = "starting".to_owned();
            }
            events.push(event(pb::ContainerEventKind::Die, c, now));
        }
        Ok(Some(c.clone()))
    }

    fn remove(
        &mut self,
        container_id: &str,
        now: &prost_types::Timestamp,
        events: &mut Vec<pb::ContainerEvent>,
    ) -> Option<pb::ObservedContainer> {
        if let Some(c) = self.containers.remove(&format!("bh-{container_id}")) {
            events.push(event(pb::ContainerEventKind::Destroy, &c, now));
        }
        None
    }

    /// Each file of the batch, as the real agent answers: one failure
    /// fails the answer and names the container.
    fn write_state_files(
        &mut self,
        batch: &pb::WriteStateFiles,
    ) -> Result<Option<pb::ObservedContainer>, String> {
        let mut missing = Vec::new();
        for w in &batch.files {
            match self.containers.get_mut(&format!("bh-{}", w.container_id)) {
                Some(c) => c.state_file = w.state.clone(),
                None => missing.push(format!("{}: not found", w.container_id)),
            }
        }
        match missing.is_empty() {
            true => Ok(None),
            false => Err(format!(
                "cannot write {} of {} state files: {}",
                missing.len(),
                batch.files.len(),
                missing.join("; ")
            )),
        }
    }

    fn with(
        &mut self,
        container_id: &str,
        change: impl FnOnce(&mut pb::ObservedContainer),
    ) -> Result<Option<pb::ObservedContainer>, String> {
        let c = self
            .containers
            .get_mut(&format!("bh-{container_id}"))
            .ok_or_else(|| format!("not found: bh-{container_id}"))?;
        change(c);
        Ok(Some(c.clone()))
    }
}

fn event(
    kind: pb::ContainerEventKind,
    c: &pb::ObservedContainer,
    at: &prost_types::Timestamp,
) -> pb::ContainerEvent {
    pb::ContainerEvent {
        kind: kind as i32,
        docker_id: c.docker_id.clone(),
        container_id: c
            .labels
            .get(CONTAINER_ID_LABEL)
            .cloned()
            .unwrap_or_default(),
        at: Some(*at),
        health: c.health.clone(),
        exit_code: c.exit_code,
        health_output: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(id: &str, container: &str, check: bool) -> pb::Command {
        pb::Command {
            command_id: id.to_owned(),
            generation: 1,
            command: Some(Kind::Create(pb::CreateContainer {
                spec: Some(pb::ContainerSpec {
                    container_id: container.to_owned(),
                    labels: [(CONTAINER_ID_LABEL.to_owned(), container.to_owned())].into(),
                    healthcheck: check.then(pb::Healthcheck::default),
                    ..Default::default()
                }),
                start: true,
            })),
        }
    }

    fn t() -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }
    }

    #[test]
    fn a_create_runs_once_and_a_repeated_id_is_answered_from_memory() {
        let mut e = Engine::new();
        let a = e.execute(&create("c1", "x", true), t());
        let c = a.result.container.clone().expect("the container");
        assert!(a.result.ok);
        assert_eq!(
            (c.docker_state.as_str(), c.health.as_str()),
            ("running", "healthy")
        );
        assert_eq!(c.docker_id.len(), 64);
        // Start and health events, with the container's id, before the answer.
        let kinds: Vec<_> = a.events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                pb::ContainerEventKind::Start as i32,
                pb::ContainerEventKind::Health as i32
            ]
        );
        assert_eq!(a.events[0].container_id, "x");
        // The same id again: the same answer, nothing new happens.
        let again = e.execute(&create("c1", "x", true), t());
        assert_eq!(again.result, a.result);
        assert!(again.events.is_empty());
        // Another id for the same container finds its twin.
        let twin = e.execute(&create("c2", "x", true), t());
        assert_eq!(twin.result.container.unwrap().docker_id, c.docker_id);
        assert_eq!(e.len(), 1);
        // Without a check, Docker reports no health.
        let plain = e.execute(&create("c3", "y", false), t());
        assert_eq!(plain.result.container.unwrap().health, "");
        assert_eq!(e.usage().1, 2);
    }

    #[test]
    fn stop_remove_and_state_files_change_what_the_report_says() {
        let mut e = Engine::new();
        e.execute(&create("c1", "x", false), t());
        let write = pb::Command {
            command_id: "w".into(),
            generation: 1,
            command: Some(Kind::WriteStateFile(pb::WriteStateFile {
                container_id: "x".into(),
                state: Some(pb::ContainerStateFile {
                    tenant_id: "t".into(),
                    ..Default::default()
                }),
            })),
        };
        let w = e.execute(&write, t());
        assert!(w.result.ok && w.result.container.is_none());
        let report = e.report(t(), String::new(), 32).remove(0);
        assert_eq!(
            report.containers[0].state_file.as_ref().unwrap().tenant_id,
            "t"
        );

        let stop = pb::Command {
            command_id: "s".into(),
            generation: 1,
            command: Some(Kind::Stop(pb::StopContainer {
                container_id: "x".into(),
                timeout: None,
            })),
        };
        let s = e.execute(&stop, t());
        assert_eq!(s.result.container.unwrap().docker_state, "exited");
        assert_eq!(s.events[0].kind, pb::ContainerEventKind::Die as i32);
        assert_eq!(e.usage().1, 0);

        let remove = pb::Command {
            command_id: "r".into(),
            generation: 1,
            command: Some(Kind::Remove(pb::RemoveContainer {
                container_id: "x".into(),
                remove_volumes: true,
            })),
        };
        let r = e.execute(&remove, t());
        assert!(r.result.ok);
        assert_eq!(r.events[0].kind, pb::ContainerEventKind::Destroy as i32);
        let empty = e.report(t(), String::new(), 32);
        assert_eq!((empty.len(), empty[0].containers.len()), (1, 0));
        // A command about a container that is not there fails, and says so.
        let missing = e.execute(&write, t());
        // ("w" was answered before: memory, not a second write.)
        assert!(missing.result.ok);
        let mut write2 = write.clone();
        write2.command_id = "w2".into();
        let failed = e.execute(&write2, t());
        assert!(!failed.result.ok && failed.result.error.contains("not found"));
    }
}
