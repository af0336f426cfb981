//! The S3 sink over HTTP, against a local S3-compatible server
//! (`moto_server`), with credentials read from a shared credentials file.

use std::path::Path;

use boilerhouse_agent::sync::{Phase, SyncJob, SyncRunner};
use boilerhouse_core::TenantId;
use boilerhouse_core::workload::{
    OnClaimError, SyncDirection, SyncMapping, SyncMode, SyncPolicy, SyncSink, SyncSpec,
};
use futures::TryStreamExt as _;
use object_store::ObjectStore as _;

fn write(path: &Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

#[tokio::test]
async fn an_s3_sink_round_trips_files_incrementally_under_the_tenant_prefix() {
    let Some(moto) = boilerhouse_testkit::s3::moto_server().unwrap() else {
        return;
    };
    moto.create_bucket("tenant-state").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let credentials = tmp.path().join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();

    let spec = SyncSpec {
        sink: SyncSink::S3 {
            bucket: "tenant-state".into(),
            region: Some("us-east-1".into()),
            endpoint: Some(moto.endpoint()),
            prefix: "sandboxes/${tenantId}/state".into(),
        },
        mappings: vec![SyncMapping {
            path: ".".into(),
            dir: None,
            pattern: None,
            sink_path: None,
            direction: SyncDirection::Bidirectional,
            mode: SyncMode::Copy,
        }],
        policy: SyncPolicy {
            on_claim: true,
            on_release: true,
            interval: None,
            on_claim_error: OnClaimError::Fail,
            manual: false,
        },
    };
    let job = |phase| SyncJob {
        tenant: TenantId::new("tenant-7").unwrap(),
        spec: spec.clone(),
        phase,
        force: None,
        pause: false,
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write(&a.join("notes.txt"), b"from container a");
    // Bigger than one multipart part: streamed as a multipart upload.
    let big: Vec<u8> = (0..(17 * 1024 * 1024)).map(|i| (i % 253) as u8).collect();
    write(&a.join("data/big.bin"), &big);
    std::fs::create_dir_all(&b).unwrap();

    let runner = SyncRunner::with_credentials_file(Some(credentials));
    let up = runner.run(&a, &job(Phase::Upload)).await.unwrap();
    assert_eq!(up[0].uploaded, 2, "{up:?}");
    assert!(up[0].errors.is_empty(), "{up:?}");

    // The objects are in the bucket under the tenant's prefix.
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("tenant-state")
        .with_region("us-east-1")
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let mut keys: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "sandboxes/tenant-7/state/.boilerhouse-manifest.json",
            "sandboxes/tenant-7/state/data/big.bin",
            "sandboxes/tenant-7/state/notes.txt",
        ]
    );

    let down = runner.run(&b, &job(Phase::Download)).await.unwrap();
    assert_eq!(down[0].downloaded, 2, "{down:?}");
    assert_eq!(
        std::fs::read(b.join("notes.txt")).unwrap(),
        b"from container a"
    );
    assert!(std::fs::read(b.join("data/big.bin")).unwrap() == big);

    let again = runner.run(&b, &job(Phase::All)).await.unwrap();
    assert_eq!(
        (again[0].uploaded, again[0].downloaded, again[0].unchanged),
        (0, 0, 2),
        "nothing changed, nothing moves"
    );

    // A mapping in the original format's terms: a container path, a
    // pattern and a sink path. Only matching files move, under the sink
    // path; a sync-mode save leaves what it does not select alone.
    let mut narrow = spec.clone();
    narrow.mappings = vec![SyncMapping {
        path: "/state/nb".into(),
        dir: Some("nb".into()),
        pattern: Some("*.ipynb".into()),
        sink_path: Some("notebooks".into()),
        direction: SyncDirection::Upload,
        mode: SyncMode::Sync,
    }];
    let c = tmp.path().join("c");
    write(&c.join("nb/x.ipynb"), b"{}");
    write(&c.join("nb/deep/z.ipynb"), b"{}");
    write(&c.join("nb/y.txt"), b"not a notebook");
    let narrow_job = SyncJob {
        spec: narrow,
        ..job(Phase::Upload)
    };
    let r = runner.run(&c, &narrow_job).await.unwrap();
    assert_eq!((r[0].uploaded, r[0].deleted), (2, 0), "{r:?}");
    let mut keys: Vec<String> = store
        .list(Some(&"sandboxes/tenant-7/state".into()))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "sandboxes/tenant-7/state/.boilerhouse-manifest.json",
            "sandboxes/tenant-7/state/data/big.bin",
            "sandboxes/tenant-7/state/notebooks/deep/z.ipynb",
            "sandboxes/tenant-7/state/notebooks/x.ipynb",
            "sandboxes/tenant-7/state/notes.txt",
        ],
        "the first mapping's files are untouched by the second's sync mode"
    );
}
