//! Which files of one mapping move, where they go in the sink, and what a
//! sync of them must not do silently.
//!
//! Paths here are relative to the mapping's directory (`rel`); sink keys
//! are relative to the tenant's prefix. A mapping's files live under its
//! key prefix: `sink_path` when given, else the directory's path in the
//! state volume, so `path: /data` (with the state volume at `/data`) and
//! `path: .` name the same files.

use globset::{GlobBuilder, GlobMatcher};

use super::{Listing, Transfer, plan};
use crate::workload::{SyncDirection, SyncMapping, SyncMode};

/// A mapping's `pattern`, with the meaning users know from `.gitignore`
/// and rclone's filters: a pattern without a `/` matches a file's name at
/// any depth (`*.ipynb`); one with a `/` matches the whole path below the
/// mapping's directory, where `*` stays within one directory and `**`
/// crosses any number of them (`**/*.ipynb`, `notebooks/*.ipynb`). A
/// leading `/` anchors the pattern at the directory and is dropped.
#[derive(Debug, Clone)]
pub struct PathFilter {
    matcher: GlobMatcher,
}

impl PathFilter {
    /// Compiles `pattern`, or says why it is not one.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let trimmed = pattern.trim();
        if trimmed.is_empty() {
            return Err("must not be empty; leave it out to sync every file".into());
        }
        if trimmed.contains('\0') {
            return Err(format!("{pattern:?} contains a NUL"));
        }
        let anchored = trimmed.strip_prefix('/');
        let glob = match anchored {
            Some(rest) => rest.to_owned(),
            None if trimmed.contains('/') => trimmed.to_owned(),
            None => format!("**/{trimmed}"),
        };
        let matcher = GlobBuilder::new(&glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("{pattern:?} is not a glob: {}", e.kind()))?
            .compile_matcher();
        Ok(Self { matcher })
    }

    /// Whether the file at `rel` (below the mapping's directory) matches.
    pub fn matches(&self, rel: &str) -> bool {
        self.matcher.is_match(rel)
    }
}

/// One mapping, resolved: its directory in the state volume, its key
/// prefix in the sink and its filter.
#[derive(Debug, Clone)]
pub struct MappingLayout {
    dir: Vec<String>,
    key_prefix: String,
    filter: Option<PathFilter>,
}

impl MappingLayout {
    /// Resolves `mapping`; an error means the workload was not validated.
    pub fn new(mapping: &SyncMapping) -> Result<Self, String> {
        Ok(Self {
            dir: mapping.dir_parts()?,
            key_prefix: mapping.key_prefix()?,
            filter: mapping
                .pattern
                .as_deref()
                .map(PathFilter::new)
                .transpose()?,
        })
    }

    /// The directory's components inside the state volume.
    pub fn dir(&self) -> &[String] {
        &self.dir
    }

    /// Whether the file at `rel` is one of the mapping's.
    pub fn selects(&self, rel: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(rel))
    }

    /// The sink key (below the tenant's prefix) of the file at `rel`.
    pub fn key(&self, rel: &str) -> String {
        if self.key_prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.key_prefix)
        }
    }

    /// The mapping's share of the sink's manifest (keyed by sink key),
    /// keyed by path below the directory.
    pub fn remote(&self, manifest: &Listing) -> Listing {
        let strip = |key: &str| -> Option<String> {
            if self.key_prefix.is_empty() {
                return Some(key.to_owned());
            }
            key.strip_prefix(&self.key_prefix)?
                .strip_prefix('/')
                .map(str::to_owned)
        };
        manifest
            .iter()
            .filter_map(|(key, meta)| Some((strip(key)?, *meta)))
            .filter(|(rel, _)| self.selects(rel))
            .collect()
    }

    /// The host's files (keyed by path below the directory) that are the
    /// mapping's.
    pub fn local(&self, listing: Listing) -> Listing {
        listing
            .into_iter()
            .filter(|(rel, _)| self.selects(rel))
            .collect()
    }
}

/// What one mapping's sync will do, and what it must say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingPlan {
    /// The transfers, by path below the mapping's directory.
    pub steps: Vec<Transfer>,
    /// Why the result is not simply "ok": nothing to upload from, or
    /// nothing matched while the sink holds files.
    pub warning: Option<String>,
}

/// Plans one mapping's sync, refusing to pass over what users lose files
/// to in silence. `uploading` says whether this sync is meant to save the
/// host's files (an upload, or a bidirectional mapping on release, on a
/// schedule or on shutdown); `source_exists` whether its directory exists.
///
/// - Saving from a directory that does not exist uploads and deletes
///   nothing, with a warning.
/// - Saving when no file matched while the sink holds the mapping's files
///   is a warning, and in `sync` mode deletes nothing: an empty or
///   unmounted directory must not empty the sink.
pub fn plan_mapping(
    direction: SyncDirection,
    mode: SyncMode,
    uploading: bool,
    source_exists: bool,
    local: &Listing,
    remote: &Listing,
) -> MappingPlan {
    if uploading && !source_exists {
        let held = if remote.is_empty() {
            String::new()
        } else {
            format!("; the sink keeps the {} file(s) it holds", remote.len())
        };
        return MappingPlan {
            steps: Vec::new(),
            warning: Some(format!(
                "the directory does not exist, so nothing was saved{held}"
            )),
        };
    }
    let mut steps = plan(direction, mode, local, remote);
    let mut warning = None;
    if uploading && local.is_empty() && !remote.is_empty() {
        let deletes = steps
            .iter()
            .filter(|s| matches!(s, Transfer::DeleteRemote(_)))
            .count();
        steps.retain(|s| !matches!(s, Transfer::DeleteRemote(_)));
        warning = Some(if deletes > 0 {
            format!(
                "no file matched, so nothing was saved; mode sync would have deleted all {deletes} \
                 file(s) the sink holds, and did not"
            )
        } else {
            format!(
                "no file matched, so nothing was saved; the sink holds {} file(s) from earlier syncs",
                remote.len()
            )
        });
    }
    MappingPlan { steps, warning }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::FileMeta;

    fn mapping(path: &str, dir: &str, pattern: Option<&str>, sink: Option<&str>) -> SyncMapping {
        SyncMapping {
            path: path.into(),
            dir: Some(dir.into()),
            pattern: pattern.map(Into::into),
            sink_path: sink.map(Into::into),
            direction: SyncDirection::Bidirectional,
            mode: SyncMode::Copy,
        }
    }

    fn listing(paths: &[&str]) -> Listing {
        paths
            .iter()
            .map(|p| {
                (
                    (*p).to_owned(),
                    FileMeta {
                        size: 1,
                        modified_ms: 1,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn patterns_mean_what_gitignore_and_rclone_users_expect() {
        let name = PathFilter::new("*.ipynb").unwrap();
        assert!(name.matches("a.ipynb"));
        assert!(name.matches("deep/er/a.ipynb"));
        assert!(!name.matches("a.py"));
        let any_depth = PathFilter::new("**/*.ipynb").unwrap();
        assert!(any_depth.matches("a.ipynb"));
        assert!(any_depth.matches("x/y/a.ipynb"));
        let one_dir = PathFilter::new("notebooks/*.ipynb").unwrap();
        assert!(one_dir.matches("notebooks/a.ipynb"));
        assert!(!one_dir.matches("notebooks/sub/a.ipynb"));
        assert!(!one_dir.matches("other/notebooks/a.ipynb"));
        let anchored = PathFilter::new("/top.txt").unwrap();
        assert!(anchored.matches("top.txt"));
        assert!(!anchored.matches("sub/top.txt"));
        assert!(PathFilter::new("a[").is_err());
        assert!(PathFilter::new("  ").is_err());
    }

    #[test]
    fn both_spellings_of_a_directory_share_keys_and_sink_path_moves_them() {
        let absolute = MappingLayout::new(&mapping("/data", "", None, None)).unwrap();
        let relative = MappingLayout::new(&mapping(".", "", None, None)).unwrap();
        assert_eq!(absolute.key("a/b.txt"), relative.key("a/b.txt"));
        assert_eq!(absolute.key("a/b.txt"), "a/b.txt");
        let sub = MappingLayout::new(&mapping("/data/nb", "nb", None, None)).unwrap();
        assert_eq!(sub.dir(), ["nb".to_owned()]);
        assert_eq!(sub.key("x.ipynb"), "nb/x.ipynb");
        let moved = MappingLayout::new(&mapping("/data/nb", "nb", None, Some("books"))).unwrap();
        assert_eq!(moved.key("x.ipynb"), "books/x.ipynb");
        let manifest = listing(&["books/x.ipynb", "booksy/y", "nb/z", "books/sub/w"]);
        assert_eq!(
            moved.remote(&manifest).keys().collect::<Vec<_>>(),
            ["sub/w", "x.ipynb"]
        );
    }

    #[test]
    fn a_pattern_limits_both_sides_so_sync_mode_never_deletes_what_it_does_not_own() {
        let layout = MappingLayout::new(&mapping("/data", "", Some("*.ipynb"), None)).unwrap();
        let local = layout.local(listing(&["a.ipynb", "b.csv"]));
        let remote = layout.remote(&listing(&["a.ipynb", "c.csv", "d.ipynb"]));
        assert_eq!(local.keys().collect::<Vec<_>>(), ["a.ipynb"]);
        assert_eq!(remote.keys().collect::<Vec<_>>(), ["a.ipynb", "d.ipynb"]);
        let planned = plan_mapping(
            SyncDirection::Upload,
            SyncMode::Sync,
            true,
            true,
            &local,
            &remote,
        );
        assert_eq!(
            planned.steps,
            vec![Transfer::DeleteRemote("d.ipynb".into())]
        );
        assert_eq!(planned.warning, None);
    }

    #[test]
    fn a_missing_directory_saves_and_deletes_nothing_and_says_so() {
        let remote = listing(&["a", "b"]);
        for mode in [SyncMode::Copy, SyncMode::Sync] {
            let planned = plan_mapping(
                SyncDirection::Upload,
                mode,
                true,
                false,
                &Listing::new(),
                &remote,
            );
            assert!(planned.steps.is_empty());
            let warning = planned.warning.unwrap();
            assert!(warning.contains("does not exist"), "{warning}");
            assert!(warning.contains("2 file(s)"), "{warning}");
        }
        // Restoring into a directory that is not there yet is normal.
        let planned = plan_mapping(
            SyncDirection::Download,
            SyncMode::Copy,
            false,
            false,
            &Listing::new(),
            &remote,
        );
        assert_eq!(planned.steps.len(), 2);
        assert_eq!(planned.warning, None);
    }

    #[test]
    fn an_empty_match_never_empties_the_sink() {
        let remote = listing(&["a", "b", "c"]);
        let planned = plan_mapping(
            SyncDirection::Upload,
            SyncMode::Sync,
            true,
            true,
            &Listing::new(),
            &remote,
        );
        assert!(planned.steps.is_empty());
        assert!(planned.warning.unwrap().contains("all 3 file(s)"));
        let planned = plan_mapping(
            SyncDirection::Upload,
            SyncMode::Copy,
            true,
            true,
            &Listing::new(),
            &remote,
        );
        assert!(planned.steps.is_empty());
        assert!(planned.warning.unwrap().contains("holds 3 file(s)"));
        // Nothing to save and nothing saved before: a quiet success.
        let planned = plan_mapping(
            SyncDirection::Upload,
            SyncMode::Sync,
            true,
            true,
            &Listing::new(),
            &Listing::new(),
        );
        assert_eq!(
            planned,
            MappingPlan {
                steps: vec![],
                warning: None
            }
        );
    }
}
