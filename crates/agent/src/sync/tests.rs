use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::sink::{PART_SIZE, parse_credentials};
use super::*;
use boilerhouse_core::workload::{OnClaimError, SyncMapping, SyncMode, SyncPolicy};

fn spec(sink_dir: &Path, mappings: &[(&str, SyncDirection, SyncMode)]) -> SyncSpec {
    SyncSpec {
        sink: SyncSink::Local {
            path: sink_dir.display().to_string(),
            prefix: "tenants/${tenantId}".into(),
        },
        mappings: mappings
            .iter()
            .map(|(path, direction, mode)| SyncMapping {
                path: (*path).into(),
                dir: None,
                pattern: None,
                sink_path: None,
                direction: *direction,
                mode: *mode,
            })
            .collect(),
        policy: SyncPolicy {
            on_claim: true,
            on_release: true,
            interval: None,
            on_claim_error: OnClaimError::Fail,
            manual: false,
        },
    }
}

fn job(spec: SyncSpec, phase: Phase) -> SyncJob {
    SyncJob {
        tenant: TenantId::new("t1").unwrap(),
        spec,
        phase,
        force: None,
        pause: false,
    }
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

fn total(reports: &[MappingReport]) -> (u32, u32, u32, u64, u32) {
    reports.iter().fold((0, 0, 0, 0, 0), |acc, r| {
        (
            acc.0 + r.uploaded,
            acc.1 + r.downloaded,
            acc.2 + r.unchanged,
            acc.3 + r.bytes,
            acc.4 + r.pending,
        )
    })
}

#[tokio::test]
async fn upload_then_download_into_a_fresh_directory_restores_files_and_times() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, first, second) = (
        tmp.path().join("sink"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    write(&first.join("notes.txt"), b"hello");
    write(&first.join("deep/er/data.bin"), &[7u8; 1000]);
    std::fs::create_dir_all(&second).unwrap();
    let spec = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    let runner = SyncRunner::default();

    let up = runner
        .run(&first, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(total(&up), (2, 0, 0, 1005, 0));
    assert_eq!(
        std::fs::read(sink.join("tenants/t1/notes.txt")).unwrap(),
        b"hello",
        "the object is where the prefix says"
    );

    let down = runner
        .run(&second, &job(spec.clone(), Phase::Download))
        .await
        .unwrap();
    assert_eq!(total(&down), (0, 2, 0, 1005, 0));
    assert_eq!(
        std::fs::read(second.join("deep/er/data.bin")).unwrap(),
        [7u8; 1000]
    );
    let times = |dir: &Path| {
        std::fs::metadata(dir.join("notes.txt"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
    assert_eq!(
        millis(times(&first)),
        millis(times(&second)),
        "modification times travel"
    );

    // Nothing changed on either side: nothing moves.
    let again = runner.run(&second, &job(spec, Phase::All)).await.unwrap();
    assert_eq!(total(&again), (0, 0, 2, 0, 0), "incremental");
}

#[tokio::test]
async fn only_changed_files_are_uploaded_and_sync_mode_deletes_extras() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, dir) = (tmp.path().join("sink"), tmp.path().join("state"));
    write(&dir.join("work/a"), b"a");
    write(&dir.join("work/b"), b"b");
    write(&dir.join("outside"), b"not mapped");
    let spec = spec(&sink, &[("work", SyncDirection::Upload, SyncMode::Sync)]);
    let runner = SyncRunner::default();
    let first = runner
        .run(&dir, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(total(&first).0, 2);
    assert!(
        !sink.join("tenants/t1/outside").exists(),
        "only the mapping"
    );

    write(&dir.join("work/b"), b"bigger");
    std::fs::remove_file(dir.join("work/a")).unwrap();
    let second = runner
        .run(&dir, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!((second[0].uploaded, second[0].deleted), (1, 1));
    assert!(!sink.join("tenants/t1/work/a").exists());
    assert_eq!(
        std::fs::read(sink.join("tenants/t1/work/b")).unwrap(),
        b"bigger"
    );

    // An upload-only mapping is not part of a claim's download.
    let down = runner.run(&dir, &job(spec, Phase::Download)).await.unwrap();
    assert!(down.is_empty());
}

#[tokio::test]
async fn bidirectional_newer_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, a, b) = (
        tmp.path().join("sink"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    let spec = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    let runner = SyncRunner::default();
    write(&a.join("f"), b"old");
    runner
        .run(&a, &job(spec.clone(), Phase::All))
        .await
        .unwrap();
    std::fs::create_dir_all(&b).unwrap();
    runner
        .run(&b, &job(spec.clone(), Phase::All))
        .await
        .unwrap();
    // b edits later than a: b's copy goes up, then comes down to a.
    let later = SystemTime::now() + Duration::from_secs(60);
    write(&b.join("f"), b"newer");
    std::fs::File::options()
        .write(true)
        .open(b.join("f"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    let up = runner
        .run(&b, &job(spec.clone(), Phase::All))
        .await
        .unwrap();
    assert_eq!(up[0].uploaded, 1);
    let down = runner.run(&a, &job(spec, Phase::All)).await.unwrap();
    assert_eq!((down[0].downloaded, down[0].uploaded), (1, 0));
    assert_eq!(std::fs::read(a.join("f")).unwrap(), b"newer");
}

#[tokio::test]
async fn symlinks_are_never_followed_out_of_the_state_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, dir, secret) = (
        tmp.path().join("sink"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    write(&secret.join("key"), b"host secret");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("escape")).unwrap();
    std::os::unix::fs::symlink(secret.join("key"), dir.join("key-link")).unwrap();
    write(&dir.join("real"), b"tenant file");

    let runner = SyncRunner::default();
    // A mapping through a symlink is refused outright: a save has nothing
    // to save and says why; a restore fails.
    let through = spec(&sink, &[("escape", SyncDirection::Upload, SyncMode::Copy)]);
    let r = runner
        .run(&dir, &job(through.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(r[0].uploaded, 0);
    assert!(
        r[0].warning.as_deref().unwrap().contains("symlink"),
        "{r:?}"
    );
    // A restore with nothing in the sink has nothing to write there; one
    // with files in the sink fails rather than write through the link.
    let mut restore = through;
    restore.mappings[0].direction = SyncDirection::Download;
    let r = runner
        .run(&dir, &job(restore.clone(), Phase::Download))
        .await
        .unwrap();
    assert!(r[0].errors.is_empty() && r[0].warning.is_some(), "{r:?}");
    let elsewhere = tmp.path().join("elsewhere");
    write(&elsewhere.join("escape/saved"), b"saved");
    let mut save = restore.clone();
    save.mappings[0].direction = SyncDirection::Upload;
    runner
        .run(&elsewhere, &job(save, Phase::Upload))
        .await
        .unwrap();
    let r = runner
        .run(&dir, &job(restore, Phase::Download))
        .await
        .unwrap();
    assert!(r[0].errors[0].contains("symlink"), "{:?}", r[0].errors);
    assert!(!secret.join("saved").exists());
    // The whole directory uploads the real file and neither link.
    let whole = spec(&sink, &[(".", SyncDirection::Upload, SyncMode::Copy)]);
    let r = runner.run(&dir, &job(whole, Phase::Upload)).await.unwrap();
    assert_eq!(r[0].uploaded, 1);
    assert!(!sink.join("tenants/t1/escape/key").exists());
    assert!(!sink.join("tenants/t1/key-link").exists());

    // A download does not write through a planted directory symlink.
    let other = tmp.path().join("other");
    write(&other.join("escape/key"), b"from the sink");
    let both = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    runner
        .run(&other, &job(both.clone(), Phase::Upload))
        .await
        .unwrap();
    let r = runner.run(&dir, &job(both, Phase::Download)).await.unwrap();
    // escape/key, and escape/saved from the restore above.
    assert_eq!(r[0].pending, 2, "{r:?}");
    assert!(r[0].errors.iter().all(|e| e.contains("symlink")), "{r:?}");
    assert_eq!(std::fs::read(secret.join("key")).unwrap(), b"host secret");
    assert!(!secret.join("saved").exists());
}

#[tokio::test]
async fn a_large_file_streams_as_a_multipart_upload_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, a, b) = (
        tmp.path().join("sink"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    // Larger than one part, and not a multiple of the read chunk.
    let size = PART_SIZE * 2 + 12345;
    let contents: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    write(&a.join("big"), &contents);
    std::fs::create_dir_all(&b).unwrap();
    let spec = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    let runner = SyncRunner::default();
    let up = runner
        .run(&a, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(up[0].bytes, size as u64);
    let down = runner.run(&b, &job(spec, Phase::Download)).await.unwrap();
    assert_eq!(down[0].bytes, size as u64);
    assert!(std::fs::read(b.join("big")).unwrap() == contents);
}

#[test]
fn credentials_files_are_read_by_profile() {
    let text = "[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[other]\naws_access_key_id=A2\naws_secret_access_key=S2\naws_session_token=T2\n";
    assert_eq!(
        parse_credentials(text, "default"),
        Some(("AK".into(), "SK".into(), None))
    );
    assert_eq!(
        parse_credentials(text, "other"),
        Some(("A2".into(), "S2".into(), Some("T2".into())))
    );
    assert_eq!(parse_credentials(text, "missing"), None);
}

#[tokio::test]
async fn patterns_and_sink_paths_move_only_matching_files_to_their_sub_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, a, b) = (
        tmp.path().join("sink"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    write(&a.join("nb/one.ipynb"), b"1");
    write(&a.join("nb/deep/two.ipynb"), b"22");
    write(&a.join("nb/scratch.tmp"), b"junk");
    std::fs::create_dir_all(&b).unwrap();
    let mut spec = spec(
        &sink,
        &[("/data/nb", SyncDirection::Bidirectional, SyncMode::Sync)],
    );
    spec.mappings[0].dir = Some("nb".into());
    spec.mappings[0].pattern = Some("*.ipynb".into());
    spec.mappings[0].sink_path = Some("notebooks".into());
    let runner = SyncRunner::default();
    let up = runner
        .run(&a, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(up[0].path, "/data/nb:*.ipynb");
    assert_eq!((up[0].uploaded, up[0].warning.as_deref()), (2, None));
    assert_eq!(
        std::fs::read(sink.join("tenants/t1/notebooks/deep/two.ipynb")).unwrap(),
        b"22"
    );
    assert!(!sink.join("tenants/t1/notebooks/scratch.tmp").exists());
    assert!(!sink.join("tenants/t1/nb").exists());
    // Restored into the mapping's directory in a fresh state directory;
    // what did not match stays behind.
    let down = runner.run(&b, &job(spec, Phase::Download)).await.unwrap();
    assert_eq!(down[0].downloaded, 2);
    assert_eq!(std::fs::read(b.join("nb/one.ipynb")).unwrap(), b"1");
    assert!(!b.join("nb/scratch.tmp").exists());
}

#[tokio::test]
async fn a_missing_directory_or_an_empty_match_is_a_warning_and_never_empties_the_sink() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, dir) = (tmp.path().join("sink"), tmp.path().join("state"));
    write(&dir.join("work/a"), b"a");
    write(&dir.join("work/b"), b"b");
    let spec = spec(&sink, &[("work", SyncDirection::Upload, SyncMode::Sync)]);
    let runner = SyncRunner::default();
    let up = runner
        .run(&dir, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!((up[0].uploaded, up[0].warning.as_deref()), (2, None));

    // The tenant empties the directory: mirroring would empty the sink.
    std::fs::remove_file(dir.join("work/a")).unwrap();
    std::fs::remove_file(dir.join("work/b")).unwrap();
    let up = runner
        .run(&dir, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    assert_eq!(up[0].deleted, 0);
    assert!(
        up[0]
            .warning
            .as_deref()
            .unwrap()
            .contains("would have deleted all 2"),
        "{up:?}"
    );
    assert!(sink.join("tenants/t1/work/a").exists());

    // The directory is gone altogether.
    std::fs::remove_dir(dir.join("work")).unwrap();
    let up = runner.run(&dir, &job(spec, Phase::Upload)).await.unwrap();
    let warning = up[0].warning.as_deref().unwrap();
    assert!(
        warning.contains("the directory does not exist"),
        "{warning}"
    );
    assert!(up[0].errors.is_empty());
    assert!(sink.join("tenants/t1/work/b").exists());
}

#[tokio::test]
async fn a_download_replaces_a_planted_file_symlink_instead_of_writing_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, a, b, outside) = (
        tmp.path().join("sink"),
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("outside"),
    );
    write(&a.join("f"), b"tenant data");
    write(&outside.join("victim"), b"host file");
    std::fs::create_dir_all(&b).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), b.join("f")).unwrap();
    let spec = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    let runner = SyncRunner::default();
    runner
        .run(&a, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    let down = runner.run(&b, &job(spec, Phase::Download)).await.unwrap();
    assert_eq!(down[0].downloaded, 1, "{down:?}");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"host file");
    assert!(
        !std::fs::symlink_metadata(b.join("f"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"tenant data");
}

#[tokio::test]
async fn objects_missing_from_the_sink_are_reported_and_dropped_from_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, a) = (tmp.path().join("sink"), tmp.path().join("a"));
    write(&a.join("kept"), b"kept");
    write(&a.join("lost"), b"lost");
    let spec = spec(
        &sink,
        &[(".", SyncDirection::Bidirectional, SyncMode::Copy)],
    );
    let runner = SyncRunner::default();
    runner
        .run(&a, &job(spec.clone(), Phase::Upload))
        .await
        .unwrap();
    // Someone deletes an object behind the manifest's back.
    std::fs::remove_file(sink.join("tenants/t1/lost")).unwrap();

    let b = tmp.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    let down = runner
        .run(&b, &job(spec.clone(), Phase::Download))
        .await
        .unwrap();
    assert_eq!((down[0].downloaded, down[0].pending), (1, 0), "{down:?}");
    assert!(down[0].errors.is_empty(), "{down:?}");
    let warning = down[0].warning.as_deref().unwrap();
    assert!(
        warning.contains("missing from the sink (lost)"),
        "{warning}"
    );
    assert_eq!(std::fs::read(b.join("kept")).unwrap(), b"kept");
    // The manifest was repaired: the next restore is clean.
    let c = tmp.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    let again = runner
        .run(&c, &job(spec.clone(), Phase::Download))
        .await
        .unwrap();
    assert_eq!(
        (again[0].downloaded, again[0].warning.as_deref()),
        (1, None)
    );

    // Nothing restorable at all is a failure, once; then a fresh start.
    std::fs::remove_file(sink.join("tenants/t1/kept")).unwrap();
    let d = tmp.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    let none = runner
        .run(&d, &job(spec.clone(), Phase::Download))
        .await
        .unwrap();
    assert_eq!(none[0].pending, 1, "{none:?}");
    assert!(
        none[0].errors[0].contains("nothing could be restored"),
        "{none:?}"
    );
    let fresh = runner.run(&d, &job(spec, Phase::Download)).await.unwrap();
    assert_eq!((fresh[0].pending, fresh[0].downloaded), (0, 0), "{fresh:?}");
    assert!(fresh[0].errors.is_empty());
}
