//! bh as a pipeline stage: a reader that goes away (`bh events | head`)
//! ends bh quietly with SIGPIPE's status, as it ends Unix tools, not with
//! a panic.

use std::process::{Command, Stdio};

fn bh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bh"))
}

#[test]
fn a_closed_pipe_ends_bh_quietly_with_sigpipes_status() {
    let (reader, writer) = std::io::pipe().unwrap();
    // Gone before bh writes a byte: its first write fails with EPIPE.
    drop(reader);
    let out = bh()
        .args(["completions", "bash"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
}

#[test]
fn a_reader_that_stays_gets_everything() {
    let out = bh().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("complete -F"), "{script}");
}
