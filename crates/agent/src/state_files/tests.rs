use super::log::{COMPACT_AT_LEAST, Fault, LOG_FILE, open_append, read_latest};
use super::*;
use boilerhouse_core::TenantId;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// A container whose directory exists, as `prepare` leaves it.
fn container(layout: &VolumeLayout) -> ContainerId {
    let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7());
    std::fs::create_dir_all(layout.container_dir(&id)).unwrap();
    id
}

fn tenant(n: u32) -> TenantId {
    TenantId::new(format!("t{n}")).unwrap()
}

fn claimed(t: u32, generation: u64) -> StateFile {
    StateFile {
        tenant_id: Some(tenant(t)),
        claim_generation: generation,
        ..Default::default()
    }
}

fn released(t: u32, generation: u64) -> StateFile {
    StateFile {
        last_tenant_id: Some(tenant(t)),
        claim_generation: generation,
        ..Default::default()
    }
}

/// What writing `writes` one at a time leaves: each container's file
/// moves forward only.
fn one_by_one(writes: &[(ContainerId, StateFile)]) -> HashMap<ContainerId, StateFile> {
    let mut files: HashMap<ContainerId, StateFile> = HashMap::new();
    for (id, incoming) in writes {
        if !files
            .get(id)
            .is_some_and(|current| current.supersedes(incoming))
        {
            files.insert(*id, incoming.clone());
        }
    }
    files
}

fn write_all(writer: &mut GroupWriter, group: &[(ContainerId, StateFile)]) {
    let borrowed: Vec<(ContainerId, &StateFile)> = group.iter().map(|(id, s)| (*id, s)).collect();
    for result in writer.write_group(&borrowed) {
        result.unwrap();
    }
}

fn log_lines(layout: &VolumeLayout) -> usize {
    std::fs::read_to_string(layout.root().join(LOG_FILE))
        .unwrap()
        .lines()
        .count()
}

fn temp_files_left(layout: &VolumeLayout, ids: &[ContainerId]) -> Vec<ContainerId> {
    ids.iter()
        .copied()
        .filter(|id| layout.container_dir(id).join(TEMP_FILE).exists())
        .collect()
}

#[test]
fn writes_in_groups_leave_the_files_writing_them_one_by_one_would() {
    for seed in 0..24u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let layout = VolumeLayout::new(dir.path());
        let mut writer = GroupWriter::open(layout.clone());
        let ids: Vec<ContainerId> = (0..5).map(|_| container(&layout)).collect();
        // Claims and releases of each container, in generations, resent
        // and arriving out of order now and then.
        let writes: Vec<(ContainerId, StateFile)> = (0..120)
            .map(|_| {
                let id = ids[rng.random_range(0..ids.len())];
                let generation = rng.random_range(1..6);
                let t = rng.random_range(0..3);
                let state = if rng.random_bool(0.5) {
                    claimed(t, generation)
                } else {
                    released(t, generation)
                };
                (id, state)
            })
            .collect();
        let mut rest = writes.as_slice();
        while !rest.is_empty() {
            let size = rng.random_range(1..=rest.len().min(16));
            let (group, after) = rest.split_at(size);
            let borrowed: Vec<(ContainerId, &StateFile)> =
                group.iter().map(|(id, s)| (*id, s)).collect();
            let results = writer.write_group(&borrowed);
            assert_eq!(results.len(), group.len(), "seed {seed}");
            for result in results {
                result.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            }
            rest = after;
        }
        let expected = one_by_one(&writes);
        for id in &ids {
            assert_eq!(
                read_state(&layout, id),
                expected.get(id).cloned(),
                "seed {seed}: container {id}"
            );
        }
        assert_eq!(temp_files_left(&layout, &ids), vec![], "seed {seed}");
        // The log says what the files said: with every file gone, a
        // restart writes them again from it.
        drop(writer);
        for id in &ids {
            let _ = std::fs::remove_file(layout.state_file(id));
        }
        GroupWriter::open(layout.clone());
        for id in &ids {
            assert_eq!(
                read_state(&layout, id),
                expected.get(id).cloned(),
                "seed {seed}: container {id} after replay"
            );
        }
    }
}

#[test]
fn a_file_that_cannot_be_replaced_once_logged_is_put_right_with_a_later_group() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let (good, bad, other) = (container(&layout), container(&layout), container(&layout));
    // The bad container's file cannot be replaced: its temp file's name is
    // taken by a directory.
    let obstacle = layout.container_dir(&bad).join(TEMP_FILE);
    std::fs::create_dir_all(obstacle.join("x")).unwrap();
    let (one, two, three) = (claimed(1, 1), claimed(2, 1), claimed(3, 1));
    let mut writer = GroupWriter::open(layout.clone());
    let results = writer.write_group(&[(good, &one), (bad, &two), (other, &three), (bad, &one)]);
    // Logged is durable, so every write stands (the log is what a start
    // replays and what later writes are judged against).
    for result in results {
        result.unwrap();
    }
    assert_eq!(read_state(&layout, &good), Some(one.clone()));
    assert_eq!(read_state(&layout, &other), Some(three.clone()));
    assert_eq!(read_state(&layout, &bad), None, "not replaced yet");
    let logged = read_latest(&layout.root().join(LOG_FILE)).unwrap();
    assert_eq!(logged.get(&bad), Some(&one));
    // Once it can be, the next group replaces it.
    std::fs::remove_dir_all(&obstacle).unwrap();
    write_all(&mut writer, &[(good, claimed(1, 2))]);
    assert_eq!(read_state(&layout, &bad), Some(one));

    // A container whose directory is gone (removed) gets no file, and no
    // directory.
    let gone = container(&layout);
    std::fs::remove_dir_all(layout.container_dir(&gone)).unwrap();
    let results = writer.write_group(&[(gone, &two)]);
    assert_eq!(
        results[0].as_ref().unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(!layout.container_dir(&gone).exists());
}

#[test]
fn writes_are_judged_against_the_log_not_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let id = container(&layout);
    let mut writer = GroupWriter::open(layout.clone());
    write_all(&mut writer, &[(id, claimed(1, 5))]);
    // Whatever the file says now (a power cut, a hand), generation 5 was
    // answered: an older write stays skipped.
    std::fs::write(
        layout.state_file(&id),
        serde_json::to_vec(&claimed(1, 1)).unwrap(),
    )
    .unwrap();
    write_all(&mut writer, &[(id, claimed(2, 3))]);
    drop(writer);
    GroupWriter::open(layout.clone());
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 5)));
}

#[test]
fn a_log_that_cannot_be_read_at_start_fails_writes_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let id = container(&layout);
    // A directory where the log should be: it cannot be read or written.
    let log = layout.root().join(LOG_FILE);
    std::fs::create_dir_all(log.join("x")).unwrap();
    let mut writer = GroupWriter::open(layout.clone());
    let results = writer.write_group(&[(id, &claimed(1, 1))]);
    assert!(results[0].is_err(), "{results:?}");
    assert_eq!(read_state(&layout, &id), None);
    std::fs::remove_dir_all(&log).unwrap();
    write_all(&mut writer, &[(id, claimed(1, 2))]);
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 2)));
    assert_eq!(log_lines(&layout), 1);
}

#[tokio::test]
async fn writes_and_removals_through_the_agents_writer() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let id = container(&layout);
    std::fs::create_dir_all(layout.container_dir(&id).join("state/deep/er")).unwrap();
    // A previous run's removal, moved aside but not yet deleted, and
    // something else someone put there.
    let trash = layout.root().join("removed");
    let left = trash.join(format!("{}.{}", container(&layout), uuid_suffix()));
    std::fs::create_dir_all(left.join("x")).unwrap();
    std::fs::create_dir_all(trash.join("not-ours")).unwrap();
    let writer = tokio::task::spawn_blocking({
        let layout = layout.clone();
        move || StateFiles::start(layout)
    })
    .await
    .unwrap()
    .unwrap();
    writer.write(id, claimed(1, 1)).await.unwrap();
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 1)));
    writer.remove(id).await.unwrap();
    assert!(!layout.container_dir(&id).exists());
    let late = writer.write(id, claimed(1, 2)).await.unwrap_err();
    assert_eq!(late.kind(), std::io::ErrorKind::NotFound);
    assert!(!layout.container_dir(&id).exists(), "not made again");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let names = || {
        std::fs::read_dir(&trash)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>()
    };
    while names() != ["not-ours"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed directories were not deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[test]
fn a_write_older_than_the_last_state_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let mut writer = GroupWriter::open(layout.clone());
    let id = container(&layout);
    // The release arrives before the claim it ends (resent commands).
    write_all(&mut writer, &[(id, released(1, 3))]);
    write_all(&mut writer, &[(id, claimed(1, 3))]);
    assert_eq!(read_state(&layout, &id), Some(released(1, 3)));
    write_all(&mut writer, &[(id, claimed(1, 2))]);
    assert_eq!(read_state(&layout, &id), Some(released(1, 3)));
    // Another tenant's claim in the same generation is not the one the
    // release ended.
    write_all(&mut writer, &[(id, claimed(2, 3))]);
    assert_eq!(read_state(&layout, &id), Some(claimed(2, 3)));
    write_all(&mut writer, &[(id, claimed(1, 4))]);
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 4)));
    // Within one group too.
    write_all(
        &mut writer,
        &[
            (id, released(1, 5)),
            (id, claimed(1, 5)),
            (id, claimed(3, 4)),
        ],
    );
    assert_eq!(read_state(&layout, &id), Some(released(1, 5)));
}

#[test]
fn writes_queued_together_share_a_group_and_are_answered_once_logged() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let ids: Vec<ContainerId> = (0..20).map(|_| container(&layout)).collect();
    let writer = GroupWriter::open(layout.clone());
    // Everything is queued before the writer looks, then a removal, then
    // a write for the removed container.
    let (queue, jobs) = mpsc::channel();
    let mut answers = Vec::new();
    for generation in 1..=5u64 {
        for (n, id) in ids.iter().enumerate() {
            let (done, answer) = oneshot::channel();
            let state = claimed(n as u32, generation);
            queue
                .send(Job::Write {
                    id: *id,
                    state,
                    done,
                })
                .unwrap();
            answers.push(answer);
        }
    }
    let (done, removed) = oneshot::channel();
    queue.send(Job::Remove { id: ids[0], done }).unwrap();
    let (done, late) = oneshot::channel();
    let state = claimed(0, 6);
    queue
        .send(Job::Write {
            id: ids[0],
            state,
            done,
        })
        .unwrap();
    drop(queue);
    writer.run(&jobs);

    for answer in answers {
        answer.blocking_recv().unwrap().unwrap();
    }
    removed.blocking_recv().unwrap().unwrap();
    assert_eq!(
        late.blocking_recv().unwrap().unwrap_err().kind(),
        std::io::ErrorKind::NotFound,
        "a write after the removal finds no directory"
    );
    assert!(!layout.container_dir(&ids[0]).exists(), "not made again");
    // One group: one line a container, not one a write.
    assert_eq!(log_lines(&layout), 20);
    let logged = read_latest(&layout.root().join(LOG_FILE)).unwrap();
    for (n, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(logged.get(id), Some(&claimed(n as u32, 5)), "durable");
        assert_eq!(read_state(&layout, id), Some(claimed(n as u32, 5)));
    }
    assert_eq!(temp_files_left(&layout, &ids), vec![]);
}

#[test]
fn a_restart_puts_right_from_the_log_the_files_a_power_cut_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let ids: Vec<ContainerId> = (0..4).map(|_| container(&layout)).collect();
    let mut writer = GroupWriter::open(layout.clone());
    for generation in 1..=3 {
        let group: Vec<_> = ids.iter().map(|id| (*id, claimed(7, generation))).collect();
        write_all(&mut writer, &group);
    }
    drop(writer);
    // The files were never synced: after a power cut one may hold an
    // older state, one half a write, one nothing at all; and the log may
    // end in half a line no one was answered for. A fourth container was
    // removed since.
    std::fs::write(
        layout.state_file(&ids[0]),
        serde_json::to_vec(&claimed(7, 1)).unwrap(),
    )
    .unwrap();
    std::fs::write(layout.state_file(&ids[1]), b"{\"tenant_id\": \"t").unwrap();
    std::fs::remove_file(layout.state_file(&ids[2])).unwrap();
    std::fs::remove_dir_all(layout.container_dir(&ids[3])).unwrap();
    let mut log = open_append(&layout.root().join(LOG_FILE)).unwrap();
    log.write_all(b"{\"container\":\"").unwrap();
    drop(log);

    let mut writer = GroupWriter::open(layout.clone());
    for id in &ids[..3] {
        assert_eq!(
            read_state(&layout, id),
            Some(claimed(7, 3)),
            "container {id}"
        );
    }
    assert!(
        !layout.container_dir(&ids[3]).exists(),
        "a removed container's directory is not made again"
    );
    assert_eq!(log_lines(&layout), 3, "one line per live container");
    // The torn line is gone, so the next group's lines parse.
    write_all(&mut writer, &[(ids[0], released(7, 3))]);
    drop(writer);
    std::fs::remove_file(layout.state_file(&ids[0])).unwrap();
    GroupWriter::open(layout.clone());
    assert_eq!(read_state(&layout, &ids[0]), Some(released(7, 3)));
}

#[test]
fn the_log_stays_about_as_big_as_the_containers_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let ids: Vec<ContainerId> = (0..10).map(|_| container(&layout)).collect();
    let mut writer = GroupWriter::open(layout.clone());
    let mut largest = 0;
    for generation in 1..=1500 {
        let group: Vec<_> = ids.iter().map(|id| (*id, claimed(1, generation))).collect();
        write_all(&mut writer, &group);
        largest = largest.max(writer.log.bytes);
    }
    // 15,000 lines of some 150 bytes were written in all.
    assert!(
        largest < COMPACT_AT_LEAST + 10_000,
        "the log reached {largest} bytes"
    );
    assert!(log_lines(&layout) < 15_000);
    drop(writer);
    GroupWriter::open(layout.clone());
    assert_eq!(log_lines(&layout), 10);
    for id in &ids {
        assert_eq!(read_state(&layout, id), Some(claimed(1, 1500)));
    }
}

#[test]
fn a_damaged_line_inside_the_log_stops_writes_and_is_not_rewritten_away() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let id = container(&layout);
    let mut writer = GroupWriter::open(layout.clone());
    write_all(&mut writer, &[(id, claimed(1, 1))]);
    write_all(&mut writer, &[(id, claimed(1, 2))]);
    drop(writer);
    let path = layout.root().join(LOG_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    // The first line damaged: skipping it would be harmless here, but a
    // damaged line may be the last word on some container.
    let damaged = text.replacen("claim_generation", "claim_gen\u{0}ration", 1);
    std::fs::write(&path, &damaged).unwrap();
    let mut writer = GroupWriter::open(layout.clone());
    let results = writer.write_group(&[(id, &claimed(1, 3))]);
    let error = results[0].as_ref().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("line 1"), "{error}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        damaged,
        "left as found"
    );
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 2)));
}

#[test]
fn a_removal_moves_the_directories_aside_and_forgets_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let (id, other) = (container(&layout), container(&layout));
    std::fs::write(layout.container_dir(&id).join("tenant-data"), b"x").unwrap();
    let mut writer = GroupWriter::open(layout.clone());
    let (trash, moved) = mpsc::channel();
    writer.trash = Some(trash);
    let results = writer.apply_group(&[
        Op::Write(id, &claimed(1, 1)),
        Op::Write(other, &claimed(2, 1)),
        Op::Remove(id),
        Op::Write(id, &claimed(1, 2)),
    ]);
    assert!(results[0].is_ok() && results[1].is_ok() && results[2].is_ok());
    assert_eq!(
        results[3].as_ref().unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(!layout.container_dir(&id).exists());
    let aside = moved.try_recv().expect("moved aside, not deleted here");
    assert!(aside.starts_with(layout.root().join("removed")));
    assert!(aside.join("tenant-data").exists());
    assert!(writer.log.logged(&id).is_none(), "forgotten");
    // A rewrite of the log keeps only the container still there.
    drop(writer);
    GroupWriter::open(layout.clone());
    let logged = read_latest(&layout.root().join(LOG_FILE)).unwrap();
    assert_eq!(logged.keys().collect::<Vec<_>>(), vec![&other]);
    assert!(!layout.container_dir(&id).exists(), "not made again");
}

#[test]
fn a_removal_whose_moves_cannot_be_synced_fails_and_goes_through_when_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let (id, other) = (container(&layout), container(&layout));
    let mut writer = GroupWriter::open(layout.clone());
    let (trash, _moved) = mpsc::channel();
    writer.trash = Some(trash);
    writer.log.fault = Some(Fault::RemovalSync);
    let results = writer.apply_group(&[Op::Write(other, &claimed(2, 1)), Op::Remove(id)]);
    assert!(results[0].is_ok(), "a write of the group stands");
    assert!(
        results[1].is_err(),
        "not answered as done while its move may not be durable"
    );
    assert!(!layout.container_dir(&id).exists(), "moved all the same");
    // The server sends it again: the directory is gone, the sync works.
    let again = writer.apply_group(&[Op::Remove(id)]);
    assert!(again[0].is_ok(), "{again:?}");
    // A removal of a container that never had directories, before any
    // trash exists, is no failure.
    let fresh = tempfile::tempdir().unwrap();
    let mut writer = GroupWriter::open(VolumeLayout::new(fresh.path()));
    let never = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7());
    let results = writer.apply_group(&[Op::Remove(never)]);
    assert!(results[0].is_ok(), "{results:?}");
}

#[test]
fn a_failed_append_loses_nothing_answered_and_leaves_no_half_line_behind() {
    let dir = tempfile::tempdir().unwrap();
    let layout = VolumeLayout::new(dir.path());
    let (id, other) = (container(&layout), container(&layout));
    let mut writer = GroupWriter::open(layout.clone());
    write_all(&mut writer, &[(id, claimed(1, 1))]);
    writer.log.fault = Some(Fault::Append);
    let results = writer.write_group(&[(id, &claimed(1, 2)), (other, &claimed(2, 1))]);
    assert!(results.iter().all(Result::is_err), "{results:?}");
    // Half a group is on disk now; the next group's lines must not be
    // glued to it.
    write_all(&mut writer, &[(other, claimed(2, 2))]);
    drop(writer);
    let logged = read_latest(&layout.root().join(LOG_FILE)).unwrap();
    assert_eq!(
        logged.get(&id),
        Some(&claimed(1, 1)),
        "the failed write is not logged"
    );
    assert_eq!(logged.get(&other), Some(&claimed(2, 2)));
    GroupWriter::open(layout.clone());
    assert_eq!(read_state(&layout, &id), Some(claimed(1, 1)));
    assert_eq!(read_state(&layout, &other), Some(claimed(2, 2)));
}

#[test]
fn a_rewrite_that_fails_at_any_step_loses_nothing_answered() {
    for fault in [Fault::RewriteWrite, Fault::RewriteDirSync] {
        let dir = tempfile::tempdir().unwrap();
        let layout = VolumeLayout::new(dir.path());
        let (id, other) = (container(&layout), container(&layout));
        let mut writer = GroupWriter::open(layout.clone());
        write_all(&mut writer, &[(id, claimed(1, 1))]);
        // The next group's append makes a rewrite due, which fails.
        writer.log.compact_at = 0;
        writer.log.fault = Some(fault);
        write_all(&mut writer, &[(id, claimed(1, 2))]);
        // No rewrite from here on but one the log needs: what is
        // appended next must reach the file the log's name points to
        // (a rewrite from memory would hide it if it did not).
        writer.log.compact_at = u64::MAX;
        write_all(&mut writer, &[(other, claimed(2, 1))]);
        write_all(&mut writer, &[(id, claimed(1, 3))]);
        drop(writer);
        let temp = layout.root().join(LOG_FILE).with_extension("log.tmp");
        assert!(!temp.exists(), "{fault:?}: the rewrite's temp file is gone");
        let logged = read_latest(&layout.root().join(LOG_FILE)).unwrap();
        assert_eq!(logged.get(&id), Some(&claimed(1, 3)), "{fault:?}");
        assert_eq!(logged.get(&other), Some(&claimed(2, 1)), "{fault:?}");
    }
}
