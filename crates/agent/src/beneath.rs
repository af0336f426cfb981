//! File operations that stay beneath a directory and never follow a
//! symlink.
//!
//! The agent runs as root and syncs the files of a tenant's state
//! directory, which the tenant controls completely: it may plant symlinks,
//! swap a directory for a symlink at any moment, or create FIFOs and device
//! nodes. Checking a path with `symlink_metadata` and then using it is a
//! race the tenant can win, and the prize is any file on the host. So
//! nothing here uses a path twice. A directory is opened once, and every
//! later name is resolved relative to that descriptor, with the kernel
//! refusing symlinks at every step (`openat2` with `RESOLVE_NO_SYMLINKS`,
//! or one `O_NOFOLLOW` component at a time). Renaming things afterwards
//! cannot change what an open descriptor refers to.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Uid};
use rustix::io::Errno;

/// Deepest directory [`Beneath::walk`] descends into. A tenant can nest
/// directories far deeper than anything worth syncing; the limit bounds
/// the descriptors held open (one per level) and the work.
pub const MAX_DEPTH: usize = 256;

/// How every directory is opened: never through a symlink as the last
/// component, and never a non-directory.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once `openat2` has answered ENOSYS (old kernel, or a seccomp
/// profile that does not know it), so later lookups skip straight to the
/// component-by-component walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Why an operation beneath a directory failed.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// A component of the path is a symlink, or the path would leave the
    /// directory. The tenant planted it; it is never followed.
    #[error("{path} passes through a symlink ({component}); not following it")]
    Symlink {
        /// The path being resolved.
        path: String,
        /// The offending component, relative to the directory (`a/b`).
        component: String,
    },
    /// A component that should be a directory is something else.
    #[error("{path}: {component} is not a directory")]
    NotADirectory {
        /// The path being resolved.
        path: String,
        /// The offending component, relative to the directory.
        component: String,
    },
    /// The path is a directory, FIFO, socket or device, not a regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// A rename or removal would replace or remove a directory.
    #[error("{path} is a directory")]
    IsADirectory {
        /// The directory.
        path: String,
    },
    /// Nothing is there.
    #[error("{path} does not exist")]
    NotFound {
        /// The path being resolved.
        path: String,
    },
    /// A name that is not one plain path component (empty, `.`, `..`, or
    /// containing `/` or NUL). Callers validate first; this is the backstop
    /// that keeps the component walk from being steered elsewhere.
    #[error("{path}: {component:?} is not a single path component")]
    BadName {
        /// The directory.
        path: String,
        /// The name.
        component: String,
    },
    /// Any other failure.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

impl BeneathError {
    /// Whether nothing was there, which callers treat as "nothing yet"
    /// rather than as a failure.
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::NotFound { .. } => true,
            Self::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

fn fail(path: String, e: Errno) -> BeneathError {
    if e == Errno::NOENT {
        BeneathError::NotFound { path }
    } else {
        BeneathError::Io {
            path,
            source: e.into(),
        }
    }
}

/// What the agent needs to know about a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Size in bytes.
    pub size: u64,
    /// Modification time in milliseconds since the epoch (truncated toward
    /// zero, as `sync` has always computed it, so manifests stay comparable).
    pub modified_ms: i64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl FileStat {
    fn of(st: &Stat) -> Self {
        let nanos = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
        Self {
            size: u64::try_from(st.st_size).unwrap_or(0),
            modified_ms: i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX),
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }
}

/// What [`Beneath::walk`] found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Regular files, by path relative to the walked directory with `/`
    /// separators.
    pub files: Vec<(String, FileStat)>,
    /// Everything not listed and not silently ignored, and why.
    pub skipped: Vec<Skipped>,
}

/// An entry [`Beneath::walk`] did not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Path relative to the walked directory (lossy if not UTF-8).
    pub path: String,
    /// Why.
    pub kind: SkippedKind,
}

/// Why an entry was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkippedKind {
    /// A symlink (never followed), or a directory that was swapped for
    /// something else between being listed and being opened.
    Symlink,
    /// A FIFO, socket or device node.
    Special,
    /// A name that is not UTF-8 or contains a backslash, which a sink key
    /// cannot carry faithfully.
    BadName,
    /// A directory deeper than [`MAX_DEPTH`]; its contents are not listed.
    TooDeep,
    /// Listed, then gone before it could be looked at.
    Vanished,
}

/// A directory opened once; every path given to its methods is resolved
/// beneath it and never through a symlink.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    /// For messages only; never used to reach the directory again.
    path: PathBuf,
}

impl AsFd for Beneath {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Beneath {
    /// Opens `path` itself (`O_DIRECTORY | O_NOFOLLOW`). The agent chooses
    /// the root, but its last component must not be a symlink: the
    /// tenant's state directory could otherwise be swapped for one.
    pub fn open(path: &Path) -> Result<Self, BeneathError> {
        let e = match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let path = path.to_owned();
                return Ok(Self { fd, path });
            }
            Err(e) => e,
        };
        let shown = path.display().to_string();
        let component = path
            .file_name()
            .map_or_else(|| shown.clone(), |n| n.to_string_lossy().into_owned());
        // Only to word the error: the open has already refused.
        let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        Err(match e {
            Errno::LOOP | Errno::NOTDIR if link => symlink(shown, &component),
            Errno::NOTDIR => BeneathError::NotADirectory {
                path: shown,
                component,
            },
            e => fail(shown, e),
        })
    }

    /// Creates `path` with all its parents, then opens it as [`open`]
    /// does. For operator-chosen paths such as a local sink's root, never
    /// for anything inside a tenant's directory.
    ///
    /// [`open`]: Beneath::open
    pub fn create(path: &Path) -> Result<Self, BeneathError> {
        std::fs::create_dir_all(path).map_err(|source| BeneathError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::open(path)
    }

    /// The path this directory was opened as, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory at `rel` (single components: no `..`, none empty, no
    /// `/`). Resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
    /// RESOLVE_NO_MAGICLINKS)`, so the kernel refuses a symlink anywhere on
    /// the way; where `openat2` is missing, one `O_NOFOLLOW` component at a
    /// time, which is just as safe. Empty `rel` opens this directory again.
    pub fn dir(&self, rel: &[impl AsRef<str>]) -> Result<Beneath, BeneathError> {
        let parts = self.check(rel)?;
        if parts.is_empty() {
            return self.reopen();
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.fd, parts.join("/"), DIR_FLAGS, Mode::empty(), resolve)
            {
                Ok(fd) => return Ok(self.child(fd, &parts)),
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(Errno::NOENT) => return Err(fail(self.shown(&parts), Errno::NOENT)),
                // A symlink (ELOOP), a symlink or file on the way (ENOTDIR),
                // an escape (EXDEV) or a rename during lookup (EAGAIN). The
                // component walk names the culprit; if the tenant has already
                // swapped things back it simply succeeds, which is as safe.
                Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV | Errno::AGAIN) => {}
                Err(e) => return Err(fail(self.shown(&parts), e)),
            }
        }
        self.dir_by_components(&parts)
    }

    /// The fallback of [`dir`](Beneath::dir): each component opened with
    /// `openat(O_DIRECTORY | O_NOFOLLOW)` relative to the previous one.
    fn dir_by_components(&self, parts: &[&str]) -> Result<Beneath, BeneathError> {
        self.by_components(parts, None)
    }

    /// Like [`dir`](Beneath::dir), creating missing directories (mode
    /// 0o755), each given to `owner` when one is named. The chown is on the
    /// new directory's descriptor, so it cannot be redirected, and best
    /// effort, since an unprivileged agent cannot chown. An existing symlink
    /// in the way is an error; it is never followed or replaced.
    pub fn create_dirs(
        &self,
        rel: &[impl AsRef<str>],
        owner: Option<(u32, u32)>,
    ) -> Result<Beneath, BeneathError> {
        self.by_components(&self.check(rel)?, Some(owner))
    }

    /// Opens `parts` (already checked) one component at a time, each
    /// relative to the last, creating missing ones when `create` says whom
    /// to give them to.
    fn by_components(
        &self,
        parts: &[&str],
        create: Option<Option<(u32, u32)>>,
    ) -> Result<Beneath, BeneathError> {
        let mut cur: Option<OwnedFd> = None;
        for (i, part) in parts.iter().enumerate() {
            let at = cur.as_ref().map_or(self.fd.as_fd(), AsFd::as_fd);
            let mut opened = rustix::fs::openat(at, *part, DIR_FLAGS, Mode::empty());
            if let (Err(Errno::NOENT), Some(owner)) = (&opened, create) {
                // EEXIST: made meanwhile by someone else; the open decides,
                // and it is not ours to give away.
                let made = match rustix::fs::mkdirat(at, *part, Mode::from_raw_mode(0o755)) {
                    Ok(()) => true,
                    Err(Errno::EXIST) => false,
                    Err(e) => return Err(fail(self.shown(&parts[..=i]), e)),
                };
                opened = rustix::fs::openat(at, *part, DIR_FLAGS, Mode::empty());
                if let (true, Ok(fd)) = (made, &opened) {
                    give(fd, owner);
                }
            }
            cur = Some(opened.map_err(|e| self.component_error(at, parts, i, e))?);
        }
        match cur {
            Some(fd) => Ok(self.child(fd, parts)),
            None => self.reopen(),
        }
    }

    /// Opens the regular file `name`, directly in this directory, for
    /// reading. `O_NOFOLLOW` refuses a symlink; `O_NONBLOCK` keeps a FIFO
    /// the tenant planted from blocking the agent forever; the `fstat` on
    /// the descriptor decides, and anything but a regular file is
    /// [`BeneathError::NotAFile`]. Blocking mode is restored before the
    /// file is returned.
    pub fn open_file(&self, name: &str) -> Result<(File, FileStat), BeneathError> {
        let name = self.check_name(name)?;
        let path = self.shown(&[name]);
        // A look first: opening a device node can have effects of its own,
        // so one the tenant planted is not even opened. Racy, hence only
        // a filter; the fstat below is what counts.
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {}
                FileType::Symlink => return Err(symlink(path, name)),
                _ => return Err(BeneathError::NotAFile { path }),
            },
            Err(e) => return Err(fail(path, e)),
        }
        self.open_regular(name, path)
    }

    /// The part of [`open_file`](Beneath::open_file) that decides: open
    /// without following or blocking, then `fstat` the descriptor.
    fn open_regular(&self, name: &str, path: String) -> Result<(File, FileStat), BeneathError> {
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => return Err(symlink(path, name)),
            // ENXIO: a socket.
            Err(Errno::NXIO) => return Err(BeneathError::NotAFile { path }),
            Err(e) => return Err(fail(path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| fail(path.clone(), e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(BeneathError::NotAFile { path });
        }
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| fail(path.clone(), e))?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|e| fail(path, e))?;
        Ok((File::from(fd), FileStat::of(&st)))
    }

    /// Opens the regular file at `rel`: the parents with
    /// [`dir`](Beneath::dir), the last component with
    /// [`open_file`](Beneath::open_file).
    pub fn open_file_at(&self, rel: &[impl AsRef<str>]) -> Result<(File, FileStat), BeneathError> {
        let parts = self.check(rel)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(self.bad_name(""));
        };
        if dirs.is_empty() {
            self.open_file(name)
        } else {
            self.dir(dirs)?.open_file(name)
        }
    }

    /// Creates a new file `<prefix><uuid v7>` in this directory for writing
    /// (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0o644), so nothing already
    /// there is ever written through; given to `owner` on its descriptor,
    /// best effort. Returns its name, for [`rename`](Beneath::rename).
    pub fn create_temp(
        &self,
        prefix: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<(String, File), BeneathError> {
        let name = format!("{prefix}{}", uuid::Uuid::now_v7());
        self.check_name(&name)?;
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY;
        let fd = rustix::fs::openat(&self.fd, &name, flags, Mode::from_raw_mode(0o644))
            .map_err(|e| fail(self.shown(&[&name]), e))?;
        give(&fd, owner);
        Ok((name, File::from(fd)))
    }

    /// Renames `from` to `to`, both single names in this directory. A file
    /// or symlink at `to` is replaced (the link itself, never what it
    /// points to); a directory there is refused.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), BeneathError> {
        let from = self.check_name(from)?;
        let to = self.check_name(to)?;
        match rustix::fs::renameat(&self.fd, from, &self.fd, to) {
            Ok(()) => Ok(()),
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => Err(BeneathError::IsADirectory {
                path: self.shown(&[to]),
            }),
            Err(e) => Err(fail(self.shown(&[from]), e)),
        }
    }

    /// Removes the file or symlink `name` (never what a link points to).
    /// A directory is refused; nothing there is
    /// [`is_not_found`](BeneathError::is_not_found).
    pub fn remove_file(&self, name: &str) -> Result<(), BeneathError> {
        let name = self.check_name(name)?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::ISDIR) => Err(BeneathError::IsADirectory {
                path: self.shown(&[name]),
            }),
            Err(e) => Err(fail(self.shown(&[name]), e)),
        }
    }

    /// Removes a temporary file on a cleanup path, where a failure has
    /// nowhere better to go than the log.
    pub fn remove_temp(&self, name: &str) {
        if let Err(e) = self.remove_file(name)
            && !e.is_not_found()
        {
            tracing::debug!(error = %e, "could not remove a temporary file");
        }
    }

    /// The directory's owner and group, so restored files can be given to
    /// the tenant.
    pub fn owner(&self) -> Result<(u32, u32), BeneathError> {
        let st = rustix::fs::fstat(&self.fd).map_err(|e| fail(self.shown::<&str>(&[]), e))?;
        Ok((st.st_uid, st.st_gid))
    }

    /// This directory opened again: a new open file description, so its
    /// reading position is its own.
    fn reopen(&self) -> Result<Beneath, BeneathError> {
        let fd = rustix::fs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| fail(self.shown::<&str>(&[]), e))?;
        Ok(Beneath {
            fd,
            path: self.path.clone(),
        })
    }

    fn child(&self, fd: OwnedFd, parts: &[&str]) -> Beneath {
        let mut path = self.path.clone();
        path.extend(parts);
        Beneath { fd, path }
    }

    /// Names the component `parts[i]`, which `openat` at `at` refused.
    fn component_error(
        &self,
        at: BorrowedFd<'_>,
        parts: &[&str],
        i: usize,
        e: Errno,
    ) -> BeneathError {
        let path = self.shown(parts);
        let component = parts[..=i].join("/");
        match e {
            Errno::LOOP | Errno::NOTDIR => {
                match rustix::fs::statat(at, parts[i], AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if !matches!(
                            FileType::from_raw_mode(st.st_mode),
                            FileType::Symlink | FileType::Directory
                        ) =>
                    {
                        BeneathError::NotADirectory { path, component }
                    }
                    Err(Errno::NOENT) => BeneathError::NotFound { path },
                    // A symlink, or a directory again: swapped back since.
                    _ => symlink(path, &component),
                }
            }
            e => fail(path, e),
        }
    }

    /// Checks that every element of `rel` is one plain component, which
    /// the component walk relies on: `..` or `a/b` would let `openat`
    /// leave the directory or follow a symlink in the middle.
    fn check<'a>(&self, rel: &'a [impl AsRef<str>]) -> Result<Vec<&'a str>, BeneathError> {
        rel.iter().map(|p| self.check_name(p.as_ref())).collect()
    }

    fn check_name<'a>(&self, name: &'a str) -> Result<&'a str, BeneathError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(self.bad_name(name));
        }
        Ok(name)
    }

    fn bad_name(&self, name: &str) -> BeneathError {
        BeneathError::BadName {
            path: self.path.display().to_string(),
            component: name.to_owned(),
        }
    }

    /// `rel` under this directory's path, for messages.
    fn shown<S: AsRef<str>>(&self, rel: &[S]) -> String {
        let mut path = self.path.clone();
        path.extend(rel.iter().map(AsRef::as_ref));
        path.display().to_string()
    }
}

fn symlink(path: String, name: &str) -> BeneathError {
    BeneathError::Symlink {
        path,
        component: name.to_owned(),
    }
}

/// Best effort: an unprivileged agent (tests) cannot chown, and then the
/// files are its own anyway.
/// An id of `!0` (-1) leaves that id alone, as chown itself would.
fn give(fd: &OwnedFd, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        let uid = (uid != !0).then(|| Uid::from_raw(uid));
        let gid = (gid != !0).then(|| Gid::from_raw(gid));
        let _ = rustix::fs::fchown(fd, uid, gid);
    }
}

/// Sets a file's modification time through its descriptor (`futimens`),
/// for restored files; the access time is left alone.
pub fn set_modified(file: &File, modified_ms: i64) -> std::io::Result<()> {
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: modified_ms.div_euclid(1000),
            tv_nsec: modified_ms.rem_euclid(1000) * 1_000_000,
        },
    };
    rustix::fs::futimens(file, &times)?;
    Ok(())
}

mod walk;

#[cfg(test)]
mod tests;
