use super::*;

fn args(extra: &[&str]) -> Args {
    let mut argv = vec!["boilerhoused"];
    argv.extend_from_slice(extra);
    Args::parse_from(argv)
}

#[test]
fn defaults_put_state_under_data() {
    let c = Config::load(args(&["--insecure"])).unwrap();
    assert_eq!(
        c.database,
        DatabaseLocation::Sqlite(PathBuf::from("./data/boilerhouse.db"))
    );
    assert!(c.synchronous_full);
    assert_eq!(c.listen.port(), 7600);
    assert_eq!(c.security, Security::Insecure);
    assert!(c.reflection);
}

#[test]
fn secure_by_default_and_the_refusal_names_the_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let err = Config::load(args(&["--data-dir", data])).unwrap_err();
    assert!(
        err.to_string().contains("server.pem") && err.to_string().contains("pki init"),
        "{err}"
    );
    let err = Config::load(args(&["--data-dir", data, "--listen", "0.0.0.0:7600"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing to serve 0.0.0.0:7600 without TLS"),
        "{err}"
    );
    assert!(err.contains("--insecure"), "{err}");

    std::fs::create_dir_all(dir.path().join("pki")).unwrap();
    for f in ["server.pem", "server.key", "ca.pem"] {
        std::fs::write(dir.path().join("pki").join(f), "x").unwrap();
    }
    let err = Config::load(args(&["--data-dir", data])).unwrap_err();
    assert!(err.to_string().contains("token create"), "{err}");
    std::fs::write(dir.path().join("tokens.toml"), "").unwrap();
    let c = Config::load(args(&["--data-dir", data])).unwrap();
    let Security::Secure { tls, tokens_file } = c.security else {
        panic!("not secure: {:?}", c.security);
    };
    assert_eq!(tls.cert, dir.path().join("pki/server.pem"));
    assert_eq!(tls.client_ca, dir.path().join("pki/ca.pem"));
    assert_eq!(tokens_file, dir.path().join("tokens.toml"));
    // Plaintext anywhere only on purpose.
    let c = Config::load(args(&[
        "--data-dir",
        data,
        "--insecure",
        "--listen",
        "0.0.0.0:7600",
    ]))
    .unwrap();
    assert_eq!(c.security, Security::Insecure);
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\ndata_dir = \"/var/bh\"\nworkloads_rescan_interval = \"5s\"\n",
    )
    .unwrap();
    let c = Config::load(args(&[
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:9100",
        "--insecure",
    ]))
    .unwrap();
    assert_eq!(c.listen.port(), 9100, "flag wins");
    assert_eq!(
        c.database,
        DatabaseLocation::Sqlite(PathBuf::from("/var/bh/boilerhouse.db")),
        "file fills the rest"
    );
    assert_eq!(c.workloads_rescan_interval, Duration::from_secs(5));
}

#[test]
fn bad_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "listn = \"127.0.0.1:9000\"\n").unwrap();
    let err = Config::load(args(&["--config", file.to_str().unwrap()])).unwrap_err();
    assert!(err.to_string().contains("listn"), "{err}");
    std::fs::write(&file, "shutdown_timeout = \"1ms\"\n").unwrap();
    let err = Config::load(args(&["--config", file.to_str().unwrap()])).unwrap_err();
    assert!(err.to_string().contains("shutdown_timeout"), "{err}");
}
