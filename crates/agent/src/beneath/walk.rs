//! The walk: a directory's regular files, listed with descriptor-relative
//! operations only, so a tenant's symlinks are seen and never followed.

use std::os::fd::OwnedFd;
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;

use super::{
    Beneath, BeneathError, DIR_FLAGS, FileStat, MAX_DEPTH, Skipped, SkippedKind, Walk, fail,
};

/// A subdirectory found by a walk, opened when its turn comes.
struct Pending {
    parent: Rc<OwnedFd>,
    name: String,
    rel: String,
    depth: usize,
}

impl Beneath {
    /// Lists this directory's regular files recursively, using only
    /// descriptor-relative operations: subdirectories opened with
    /// `O_DIRECTORY | O_NOFOLLOW`, every entry looked at with `statat`
    /// without following (the entry's `d_type` alone is not trusted).
    /// Symlinks, special files and bad names are reported, never followed;
    /// names starting with `skip_prefix` (the agent's temporary files) are
    /// left out silently. Iterative, at most [`MAX_DEPTH`] levels deep, and
    /// holding one descriptor per level.
    pub fn walk(&self, skip_prefix: &str) -> Result<Walk, BeneathError> {
        let mut walk = Walk::default();
        let mut pending = Vec::new();
        let mut next = Some((Rc::new(self.reopen()?.fd), String::new(), 0));
        loop {
            if let Some((fd, rel, depth)) = next.take() {
                self.read_into(&fd, &rel, depth, skip_prefix, &mut walk, &mut pending)?;
            }
            let Some(sub) = pending.pop() else {
                return Ok(walk);
            };
            match rustix::fs::openat(&*sub.parent, sub.name.as_str(), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => next = Some((Rc::new(fd), sub.rel, sub.depth)),
                Err(Errno::NOENT) => walk.skip(sub.rel, SkippedKind::Vanished),
                Err(Errno::LOOP | Errno::NOTDIR) => walk.skip(sub.rel, SkippedKind::Symlink),
                Err(e) => return Err(fail(self.shown(&[&sub.rel]), e)),
            }
        }
    }

    /// Reads one directory of a walk: files into `walk`, subdirectories
    /// onto `pending` (opened later, holding the parent open meanwhile).
    fn read_into(
        &self,
        fd: &Rc<OwnedFd>,
        rel: &str,
        depth: usize,
        skip_prefix: &str,
        walk: &mut Walk,
        pending: &mut Vec<Pending>,
    ) -> Result<(), BeneathError> {
        let error = |e| fail(self.shown(&[rel]), e);
        let mut dir = rustix::fs::Dir::read_from(&**fd).map_err(error)?;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(error)?;
            let raw = entry.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(raw) else {
                walk.skip(
                    join(rel, &String::from_utf8_lossy(raw)),
                    SkippedKind::BadName,
                );
                continue;
            };
            if !skip_prefix.is_empty() && name.starts_with(skip_prefix) {
                continue;
            }
            let path = join(rel, name);
            if name.contains('\\') {
                walk.skip(path, SkippedKind::BadName);
                continue;
            }
            let st = match rustix::fs::statat(&**fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => {
                    walk.skip(path, SkippedKind::Vanished);
                    continue;
                }
                Err(e) => return Err(fail(self.shown(&[&path]), e)),
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => walk.files.push((path, FileStat::of(&st))),
                FileType::Directory if depth >= MAX_DEPTH => {
                    walk.skip(path, SkippedKind::TooDeep);
                }
                FileType::Directory => pending.push(Pending {
                    parent: Rc::clone(fd),
                    name: name.to_owned(),
                    rel: path,
                    depth: depth + 1,
                }),
                FileType::Symlink => walk.skip(path, SkippedKind::Symlink),
                _ => walk.skip(path, SkippedKind::Special),
            }
        }
        Ok(())
    }
}

impl Walk {
    fn skip(&mut self, path: String, kind: SkippedKind) {
        self.skipped.push(Skipped { path, kind });
    }
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    }
}
