//! A node's reported containers, found by Docker id.
//!
//! Why not a `BTreeMap<String, Arc<ObservedContainer>>`: its key would be
//! a second copy of every Docker id the container already holds, 64 bytes
//! and an allocation for each of 100,000 containers; here the container
//! is its own key.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::sync::Arc;

use boilerhouse_core::container::ObservedContainer;

/// The containers of one report, each once by Docker id, in id order.
#[derive(Debug, Clone, Default)]
pub struct ReportedContainers(BTreeSet<ByDockerId>);

/// A container, compared and ordered by its Docker id alone.
#[derive(Debug, Clone)]
struct ByDockerId(Arc<ObservedContainer>);

impl PartialEq for ByDockerId {
    fn eq(&self, other: &Self) -> bool {
        self.0.docker_id == other.0.docker_id
    }
}

impl Eq for ByDockerId {}

impl PartialOrd for ByDockerId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByDockerId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.docker_id.cmp(&other.0.docker_id)
    }
}

/// Lookups by `&str` find what `Ord` orders by: the same string.
impl Borrow<str> for ByDockerId {
    fn borrow(&self) -> &str {
        &self.0.docker_id
    }
}

impl ReportedContainers {
    /// The container with this Docker id.
    pub fn get(&self, docker_id: &str) -> Option<&Arc<ObservedContainer>> {
        self.0.get(docker_id).map(|c| &c.0)
    }

    /// Every container, in Docker id order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<ObservedContainer>> + '_ {
        self.0.iter().map(|c| &c.0)
    }

    /// Their Docker ids, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|c| c.0.docker_id.as_str())
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `container`, or replaces the one with its Docker id.
    pub fn insert(&mut self, container: Arc<ObservedContainer>) {
        // `replace`, not `insert`: a set keeps the element it has when an
        // equal one is inserted, and the new one is what was reported.
        self.0.replace(ByDockerId(container));
    }

    /// Removes the container with this Docker id.
    pub fn remove(&mut self, docker_id: &str) {
        self.0.remove(docker_id);
    }

    /// Keeps only the containers `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&ObservedContainer) -> bool) {
        self.0.retain(|c| keep(&c.0));
    }

    /// Changes the container with this Docker id, if there is one; a copy
    /// if a reader holds it still. The change must keep its Docker id.
    pub fn update(&mut self, docker_id: &str, change: impl FnOnce(&mut ObservedContainer)) {
        if let Some(ByDockerId(mut container)) = self.0.take(docker_id) {
            let c = Arc::make_mut(&mut container);
            change(c);
            debug_assert_eq!(c.docker_id, docker_id, "an update changed the key");
            self.0.insert(ByDockerId(container));
        }
    }
}

impl FromIterator<ObservedContainer> for ReportedContainers {
    /// A Docker id given twice keeps the last, as a map's insert would.
    fn from_iter<I: IntoIterator<Item = ObservedContainer>>(containers: I) -> Self {
        let mut set = Self::default();
        for c in containers {
            set.insert(Arc::new(c));
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boilerhouse_core::container::Labels;
    use std::collections::BTreeMap;

    fn observed(docker_id: &str, state: &str) -> ObservedContainer {
        ObservedContainer {
            docker_id: docker_id.to_owned(),
            name: format!("name-{docker_id}"),
            labels: Labels::default(),
            docker_state: state.to_owned(),
            health: None,
            health_output: None,
            exit_code: 0,
            started_at: None,
            oom_killed: false,
            limits: Default::default(),
            state_file: None,
        }
    }

    /// Every operation, against the map it replaces, over a sequence of
    /// them: the same containers, found the same way, in the same order.
    #[test]
    fn it_keeps_what_a_map_by_docker_id_would() {
        let mut set = ReportedContainers::default();
        let mut map: BTreeMap<String, ObservedContainer> = BTreeMap::new();
        let ids = ["c", "a", "e", "b", "d"];
        for (step, id) in ids.iter().cycle().take(40).enumerate() {
            let state = format!("s{step}");
            match step % 5 {
                0 | 1 => {
                    set.insert(Arc::new(observed(id, &state)));
                    map.insert(id.to_string(), observed(id, &state));
                }
                2 => {
                    set.update(id, |c| c.docker_state = state.clone());
                    if let Some(c) = map.get_mut(*id) {
                        c.docker_state = state.clone();
                    }
                }
                3 => {
                    set.remove(id);
                    map.remove(*id);
                }
                _ => {
                    set.retain(|c| c.docker_id != "e");
                    map.retain(|k, _| k != "e");
                }
            }
            let from_set: Vec<ObservedContainer> =
                set.values().map(|c| c.as_ref().clone()).collect();
            let from_map: Vec<ObservedContainer> = map.values().cloned().collect();
            assert_eq!(from_set, from_map, "after step {step}");
            assert_eq!(
                set.keys().collect::<Vec<_>>(),
                map.keys().map(String::as_str).collect::<Vec<_>>()
            );
            for probe in ids {
                assert_eq!(
                    set.get(probe).map(|c| c.as_ref()),
                    map.get(probe),
                    "{probe} after step {step}"
                );
            }
        }
        let again: ReportedContainers = [observed("x", "old"), observed("x", "new")]
            .into_iter()
            .collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again.get("x").unwrap().docker_state, "new");
    }

    #[test]
    fn an_update_leaves_a_copy_a_reader_holds_alone() {
        let mut set: ReportedContainers = [observed("a", "running")].into_iter().collect();
        let held = set.get("a").unwrap().clone();
        set.update("a", |c| c.docker_state = "exited".into());
        assert_eq!(held.docker_state, "running");
        assert_eq!(set.get("a").unwrap().docker_state, "exited");
    }
}
