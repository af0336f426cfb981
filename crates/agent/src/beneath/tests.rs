use super::*;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, symlink};
use std::sync::Arc;
use tempfile::TempDir;

const SECRET: &str = "SECRET-OUTSIDE";

/// A root to work beneath, and a directory outside it holding a secret
/// (`secret.txt`, `f`, and a subdirectory `b/` with another copy) that
/// nothing may ever reach.
fn setup() -> (TempDir, TempDir, Beneath) {
    let root = TempDir::new().unwrap();
    let outside = TempDir::new().unwrap();
    std::fs::write(outside.path().join("secret.txt"), SECRET).unwrap();
    std::fs::write(outside.path().join("f"), SECRET).unwrap();
    std::fs::create_dir(outside.path().join("b")).unwrap();
    std::fs::write(outside.path().join("b/secret.txt"), SECRET).unwrap();
    let beneath = Beneath::open(root.path()).unwrap();
    (root, outside, beneath)
}

fn read(file: &mut File) -> String {
    let mut s = String::new();
    file.read_to_string(&mut s).unwrap();
    s
}

fn symlink_component(result: Result<impl std::fmt::Debug, BeneathError>) -> String {
    match result {
        Err(BeneathError::Symlink { component, .. }) => component,
        other => panic!("expected a Symlink error, got {other:?}"),
    }
}

#[test]
fn dir_refuses_a_symlink_to_outside_at_any_depth() {
    let (root, outside, b) = setup();
    symlink(outside.path(), root.path().join("a")).unwrap();
    assert_eq!(symlink_component(b.dir(&["a", "b"])), "a");
    assert_eq!(symlink_component(b.dir(&["a"])), "a");
    assert_eq!(symlink_component(b.dir_by_components(&["a", "b"])), "a");
    assert_eq!(symlink_component(b.dir_by_components(&["a"])), "a");

    std::fs::create_dir(root.path().join("c")).unwrap();
    symlink(outside.path(), root.path().join("c/b")).unwrap();
    assert_eq!(symlink_component(b.dir(&["c", "b"])), "c/b");
    assert_eq!(symlink_component(b.dir_by_components(&["c", "b"])), "c/b");
    assert_eq!(symlink_component(b.dir(&["c", "b", "b"])), "c/b");
    assert_eq!(
        symlink_component(b.dir_by_components(&["c", "b", "b"])),
        "c/b"
    );
}

#[test]
fn dir_refuses_a_symlink_pointing_inside_the_root() {
    let (root, _outside, b) = setup();
    std::fs::create_dir_all(root.path().join("real/sub")).unwrap();
    symlink("real", root.path().join("rel")).unwrap();
    symlink(root.path().join("real"), root.path().join("abs")).unwrap();
    for link in ["rel", "abs"] {
        assert_eq!(symlink_component(b.dir(&[link, "sub"])), link);
        assert_eq!(symlink_component(b.dir_by_components(&[link, "sub"])), link);
    }
    assert!(b.dir(&["real", "sub"]).is_ok());
}

#[test]
fn dir_opens_real_directories_and_names_other_failures() {
    let (root, _outside, b) = setup();
    std::fs::create_dir_all(root.path().join("a/b")).unwrap();
    std::fs::write(root.path().join("a/b/f"), "hello").unwrap();
    std::fs::write(root.path().join("file"), "x").unwrap();

    for sub in [
        b.dir(&["a", "b"]).unwrap(),
        b.dir_by_components(&["a", "b"]).unwrap(),
    ] {
        assert_eq!(sub.path(), root.path().join("a/b"));
        let (mut f, stat) = sub.open_file("f").unwrap();
        assert_eq!((read(&mut f), stat.size), ("hello".to_owned(), 5));
    }
    let none: [&str; 0] = [];
    let same = b.dir(&none).unwrap();
    assert_eq!(same.path(), root.path());
    assert_eq!(same.walk("").unwrap().files.len(), 2);

    let e = b.dir(&["file", "x"]).unwrap_err();
    assert!(
        matches!(&e, BeneathError::NotADirectory { component, .. } if component == "file"),
        "{e:?}"
    );
    let e = b.dir_by_components(&["file"]).unwrap_err();
    assert!(matches!(e, BeneathError::NotADirectory { .. }), "{e:?}");
    assert!(b.dir(&["a", "missing"]).unwrap_err().is_not_found());
    assert!(
        b.dir_by_components(&["missing"])
            .unwrap_err()
            .is_not_found()
    );
    for bad in ["..", ".", "", "a/b", "a\0"] {
        let e = b.dir(&[bad]).unwrap_err();
        assert!(matches!(e, BeneathError::BadName { .. }), "{bad:?}: {e:?}");
    }
}

#[test]
fn open_refuses_a_symlinked_root() {
    let (root, outside, _b) = setup();
    symlink(outside.path(), root.path().join("link")).unwrap();
    assert_eq!(
        symlink_component(Beneath::open(&root.path().join("link"))),
        "link"
    );
    let created = Beneath::create(&root.path().join("x/y")).unwrap();
    assert_eq!(created.path(), root.path().join("x/y"));
    assert!(root.path().join("x/y").is_dir());
    assert!(
        Beneath::open(&root.path().join("nope"))
            .unwrap_err()
            .is_not_found()
    );
}

#[test]
fn open_file_never_reads_through_a_symlink() {
    let (root, outside, b) = setup();
    symlink(outside.path(), root.path().join("a")).unwrap();
    symlink(outside.path().join("secret.txt"), root.path().join("s")).unwrap();
    std::fs::create_dir(root.path().join("d")).unwrap();
    symlink(outside.path().join("secret.txt"), root.path().join("d/s")).unwrap();

    assert_eq!(symlink_component(b.open_file_at(&["a", "secret.txt"])), "a");
    assert_eq!(symlink_component(b.open_file_at(&["s"])), "s");
    assert_eq!(symlink_component(b.open_file("s")), "s");
    assert_eq!(symlink_component(b.open_file_at(&["d", "s"])), "s");
    // The check after the open, on its own, refuses a link too.
    let path = b.shown(&["s"]);
    assert_eq!(symlink_component(b.open_regular("s", path)), "s");
    assert!(b.open_file("missing").unwrap_err().is_not_found());
    let none: [&str; 0] = [];
    assert!(matches!(
        b.open_file_at(&none),
        Err(BeneathError::BadName { .. })
    ));
}

#[test]
fn open_file_reports_size_and_time_and_refuses_non_files() {
    let (root, _outside, b) = setup();
    std::fs::create_dir(root.path().join("d")).unwrap();
    std::fs::write(root.path().join("d/f"), "12345").unwrap();
    let (_, stat) = b.open_file_at(&["d", "f"]).unwrap();
    assert_eq!(stat.size, 5);
    let d = b.dir(&["d"]).unwrap();
    let (name, mut w) = d.create_temp(".boilerhouse-", None).unwrap();
    w.write_all(b"abc").unwrap();
    set_modified(&w, 1_600_000_000_123).unwrap();
    drop(w);
    d.rename(&name, "g").unwrap();
    let (mut g, stat) = b.open_file_at(&["d", "g"]).unwrap();
    assert_eq!(read(&mut g), "abc");
    assert_eq!((stat.size, stat.modified_ms), (3, 1_600_000_000_123));
    // Blocking mode is back once the file is handed out.
    let flags = rustix::fs::fcntl_getfl(&g).unwrap();
    assert!(!flags.contains(OFlags::NONBLOCK));

    let (_, w) = b.create_temp(".t-", None).unwrap();
    set_modified(&w, -1500).unwrap();
    let name = b
        .walk("")
        .unwrap()
        .files
        .into_iter()
        .find(|(p, _)| p.starts_with(".t-"));
    assert_eq!(name.unwrap().1.modified_ms, -1500);

    assert!(matches!(
        b.open_file("d"),
        Err(BeneathError::NotAFile { .. })
    ));
}

#[test]
fn a_fifo_is_not_a_file_and_does_not_block() {
    let (_root, _outside, b) = setup();
    rustix::fs::mkfifoat(&b, "p", Mode::from_raw_mode(0o644)).unwrap();
    let b = Arc::new(b);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = Arc::clone(&b);
    std::thread::spawn(move || {
        let path = worker.shown(&["p"]);
        // Past the look before opening: the open itself must not block.
        let direct = worker.open_regular("p", path).map(|_| ());
        let _ = tx.send((worker.open_file("p").map(|_| ()), direct));
    });
    let (checked, direct) = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("opening a FIFO blocked");
    assert!(
        matches!(checked, Err(BeneathError::NotAFile { .. })),
        "{checked:?}"
    );
    assert!(
        matches!(direct, Err(BeneathError::NotAFile { .. })),
        "{direct:?}"
    );
}

#[test]
fn create_dirs_creates_but_never_through_a_symlink() {
    let root = TempDir::new().unwrap();
    let outside = TempDir::new().unwrap();
    let b = Beneath::open(root.path()).unwrap();
    symlink(outside.path(), root.path().join("a")).unwrap();
    std::fs::create_dir(root.path().join("real")).unwrap();
    symlink(outside.path(), root.path().join("real/l")).unwrap();
    std::fs::write(root.path().join("file"), "").unwrap();

    assert_eq!(symlink_component(b.create_dirs(&["a", "new"], None)), "a");
    assert_eq!(symlink_component(b.create_dirs(&["a"], None)), "a");
    assert_eq!(
        symlink_component(b.create_dirs(&["real", "l", "x"], None)),
        "real/l"
    );
    assert!(matches!(
        b.create_dirs(&["file", "x"], None),
        Err(BeneathError::NotADirectory { .. })
    ));
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(
        std::fs::symlink_metadata(root.path().join("a"))
            .unwrap()
            .is_symlink()
    );

    // Running as root, the new directories really are given away.
    let root_runs = std::fs::metadata(root.path()).unwrap().uid() == 0;
    let owner = if root_runs {
        (4321, 4322)
    } else {
        b.owner().unwrap()
    };
    let made = b.create_dirs(&["x", "y", "z"], Some(owner)).unwrap();
    assert_eq!(made.path(), root.path().join("x/y/z"));
    for p in ["x", "x/y", "x/y/z"] {
        let m = std::fs::symlink_metadata(root.path().join(p)).unwrap();
        assert!(m.is_dir());
        assert_eq!((m.uid(), m.gid()), owner, "{p}");
    }
    assert_eq!(made.owner().unwrap(), owner);
    // Existing directories are used as they are.
    std::fs::write(root.path().join("x/y/z/f"), "kept").unwrap();
    let again = b.create_dirs(&["x", "y", "z"], None).unwrap();
    assert_eq!(read(&mut again.open_file("f").unwrap().0), "kept");
}

#[test]
fn rename_replaces_a_symlink_never_writing_through_it() {
    let (root, outside, b) = setup();
    std::fs::write(outside.path().join("victim"), "VICTIM").unwrap();
    symlink(outside.path().join("victim"), root.path().join("x")).unwrap();

    let (tmp, mut file) = b.create_temp(".boilerhouse-", None).unwrap();
    assert!(tmp.starts_with(".boilerhouse-") && tmp.len() > ".boilerhouse-".len());
    file.write_all(b"NEW").unwrap();
    drop(file);
    b.rename(&tmp, "x").unwrap();

    let m = std::fs::symlink_metadata(root.path().join("x")).unwrap();
    assert!(m.is_file());
    assert_eq!(
        std::fs::read_to_string(root.path().join("x")).unwrap(),
        "NEW"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).unwrap(),
        "VICTIM"
    );
    assert!(!root.path().join(&tmp).exists());
}

#[test]
fn rename_refuses_to_replace_a_directory() {
    let (root, _outside, b) = setup();
    std::fs::create_dir(root.path().join("empty")).unwrap();
    std::fs::create_dir(root.path().join("full")).unwrap();
    std::fs::write(root.path().join("full/f"), "").unwrap();
    let (tmp, _file) = b.create_temp(".boilerhouse-", None).unwrap();
    for dir in ["empty", "full"] {
        let e = b.rename(&tmp, dir).unwrap_err();
        assert!(
            matches!(&e, BeneathError::IsADirectory { path } if path.ends_with(dir)),
            "{e:?}"
        );
    }
    assert!(root.path().join(&tmp).is_file());
    b.remove_temp(&tmp);
    assert!(!root.path().join(&tmp).exists());
    b.remove_temp(&tmp);
    assert!(matches!(
        b.rename("x", "../y"),
        Err(BeneathError::BadName { .. })
    ));
}

#[test]
fn remove_file_removes_the_link_not_its_target() {
    let (root, outside, b) = setup();
    symlink(outside.path().join("secret.txt"), root.path().join("l")).unwrap();
    symlink(outside.path(), root.path().join("dl")).unwrap();
    b.remove_file("l").unwrap();
    b.remove_file("dl").unwrap();
    assert!(std::fs::symlink_metadata(root.path().join("l")).is_err());
    assert!(std::fs::symlink_metadata(root.path().join("dl")).is_err());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
        SECRET
    );
    assert!(outside.path().join("b/secret.txt").exists());
    assert!(b.remove_file("l").unwrap_err().is_not_found());
    std::fs::create_dir(root.path().join("d")).unwrap();
    assert!(matches!(
        b.remove_file("d"),
        Err(BeneathError::IsADirectory { .. })
    ));
}

#[test]
fn walk_lists_files_and_reports_what_it_skips() {
    use std::os::unix::ffi::OsStrExt as _;
    let (root, outside, b) = setup();
    let r = root.path();
    std::fs::create_dir_all(r.join("sub/deep")).unwrap();
    std::fs::write(r.join("a.txt"), "abc").unwrap();
    std::fs::write(r.join("sub/b.txt"), "hello").unwrap();
    std::fs::write(r.join("sub/deep/c.txt"), "c").unwrap();
    std::fs::write(r.join(".boilerhouse-123"), "tmp").unwrap();
    std::fs::create_dir(r.join("sub/.boilerhouse-dir")).unwrap();
    std::fs::write(r.join("sub/.boilerhouse-dir/x"), "tmp").unwrap();
    symlink(outside.path().join("secret.txt"), r.join("link_file")).unwrap();
    symlink(outside.path(), r.join("link_dir")).unwrap();
    symlink("sub", r.join("link_in")).unwrap();
    symlink("a.txt", r.join("sub/link_up")).unwrap();
    rustix::fs::mkfifoat(&b, "sub/fifo", Mode::from_raw_mode(0o644)).unwrap();
    std::fs::write(r.join(std::ffi::OsStr::from_bytes(b"bad\xff")), "").unwrap();
    std::fs::write(r.join("back\\slash"), "").unwrap();

    let walk = b.walk(".boilerhouse-").unwrap();
    let mut files: Vec<_> = walk
        .files
        .iter()
        .map(|(p, s)| (p.as_str(), s.size))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [("a.txt", 3), ("sub/b.txt", 5), ("sub/deep/c.txt", 1)]
    );
    let mut skipped: Vec<_> = walk
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.kind))
        .collect();
    skipped.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        skipped,
        [
            ("back\\slash", SkippedKind::BadName),
            ("bad\u{fffd}", SkippedKind::BadName),
            ("link_dir", SkippedKind::Symlink),
            ("link_file", SkippedKind::Symlink),
            ("link_in", SkippedKind::Symlink),
            ("sub/fifo", SkippedKind::Special),
            ("sub/link_up", SkippedKind::Symlink),
        ]
    );
    // Without a prefix the temporary files are ordinary files.
    let all = b.walk("").unwrap();
    assert!(all.files.iter().any(|(p, _)| p == "sub/.boilerhouse-dir/x"));
    assert!(!all.files.iter().any(|(p, _)| p.contains("secret")));
}

#[test]
fn walk_stops_at_the_depth_limit() {
    let (_root, _outside, b) = setup();
    let deep = vec!["d"; MAX_DEPTH + 2];
    b.create_dirs(&deep, None).unwrap();
    let (name, _file) = b.dir(&deep).unwrap().create_temp("f", None).unwrap();
    b.dir(&deep[..MAX_DEPTH])
        .unwrap()
        .create_temp("g", None)
        .unwrap();
    let walk = b.walk("").unwrap();
    let limit = deep[..=MAX_DEPTH].join("/");
    assert_eq!(
        walk.skipped,
        [Skipped {
            path: limit,
            kind: SkippedKind::TooDeep
        }]
    );
    assert_eq!(walk.files.len(), 1, "only g, at the limit");
    assert!(!walk.files[0].0.ends_with(&name));
}

/// A tenant swapping a directory for a symlink to outside (and back, and
/// away) as fast as it can, while the agent walks and opens: nothing the
/// agent gets may come from outside, and failures are only refusals.
#[test]
fn a_tenant_racing_symlink_swaps_never_gets_the_agent_outside() {
    let (root, outside, b) = setup();
    std::fs::create_dir(root.path().join("d")).unwrap();
    std::fs::write(root.path().join("d/f"), "inside").unwrap();
    symlink(outside.path(), root.path().join("dl")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = Arc::clone(&stop);
        let dir = Beneath::open(root.path()).unwrap();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if swaps % 3 == 2 {
                    // Away and back: a window where `d` is missing.
                    rustix::fs::renameat(&dir, "d", &dir, "gone").unwrap();
                    rustix::fs::renameat(&dir, "gone", &dir, "d").unwrap();
                } else {
                    let exchange = rustix::fs::RenameFlags::EXCHANGE;
                    rustix::fs::renameat_with(&dir, "d", &dir, "dl", exchange).unwrap();
                }
                swaps += 1;
            }
            swaps
        })
    };

    let refused = |e: &BeneathError| {
        matches!(
            e,
            BeneathError::Symlink { .. } | BeneathError::NotADirectory { .. }
        ) || e.is_not_found()
    };
    let check_walk = |walk: &Walk| {
        for (path, stat) in &walk.files {
            assert!(!path.contains("secret"), "{path}");
            assert_eq!(stat.size, "inside".len() as u64, "{path}");
        }
    };
    let (mut opened, mut refusals) = (0, 0);
    for i in 0..400 {
        check_walk(&b.walk("").unwrap());
        let sub = if i % 2 == 0 {
            b.dir(&["d"])
        } else {
            b.dir_by_components(&["d"])
        };
        match sub {
            Ok(sub) => check_walk(&sub.walk("").unwrap()),
            Err(e) => assert!(refused(&e), "{e:?}"),
        }
        match b.open_file_at(&["d", "f"]) {
            Ok((mut f, stat)) => {
                assert_eq!(read(&mut f), "inside");
                assert_eq!(stat.size, 6);
                opened += 1;
            }
            Err(e) => {
                assert!(refused(&e), "{e:?}");
                refusals += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert_eq!(opened + refusals, 400);
    assert!(swaps > 0);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("f")).unwrap(),
        SECRET
    );
}
