//! The multi-host harness itself: hosts in network namespaces reach each
//! other and the test process, each fault blocks what it says and its heal
//! restores it, and nothing is left behind. Skipped (loudly) without root
//! or iproute2/nftables/iptables, unless BOILERHOUSE_REQUIRE_NETNS=1.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use boilerhouse_testkit::netns::{Host, Network, clean_run, require_netns};

/// Long enough for any connection that should work, on a loaded machine.
const WORKS: Duration = Duration::from_secs(10);
/// How long a connection that should not work is given.
const BLOCKED: Duration = Duration::from_millis(1500);

fn network(hosts: &[&str]) -> Option<Network> {
    require_netns().then(|| Network::new(hosts).expect("make a test network"))
}

/// A listener on `host` that accepts (and echoes one line) forever.
fn echo_server(host: &Host) -> SocketAddr {
    let listener = host.tcp_listen(0).expect("listen");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || serve(listener));
    addr
}

fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// Connects from `from` to `to` and gets an echo back.
fn echo(from: &Host, to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = from.tcp_connect(to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

/// `from` reaches `to` within [`WORKS`]: retrying, as a client would,
/// since a host that just came back may first answer "no route to host"
/// (its neighbours' failed ARP entries).
fn assert_reaches(net: &Network, from: &Host, to: SocketAddr) {
    let deadline = Instant::now() + WORKS;
    loop {
        match echo(from, to, WORKS) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!(
                "{} should reach {to}: {e}\n{}",
                from.name(),
                net.describe_faults()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn assert_blocked(net: &Network, from: &Host, to: SocketAddr) {
    match from.tcp_connect(to, BLOCKED) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "{} should not reach {to}, got {other:?}\n{}",
            from.name(),
            net.describe_faults()
        ),
    }
}

#[test]
fn hosts_and_the_client_reach_each_other_over_tcp() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let (a, b, client) = (
        net.host("a").unwrap(),
        net.host("b").unwrap(),
        net.client().clone(),
    );
    assert_ne!(a.ip(), b.ip());
    assert!(net.subnet().starts_with("10."), "{}", net.subnet());
    let on_a = echo_server(&a);
    let on_b = echo_server(&b);
    let on_client = echo_server(&client);
    assert_eq!(on_a.ip(), a.ip());
    for (from, to) in [
        (&a, on_b),
        (&b, on_a),
        (&client, on_a),
        (&client, on_b),
        (&a, on_client),
    ] {
        assert_reaches(&net, from, to);
    }
    // Each host is its own machine: a's loopback is not b's.
    let local = a.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = local.local_addr().unwrap().port();
    assert!(
        b.tcp_connect(([127, 0, 0, 1], port).into(), BLOCKED)
            .is_err()
    );
    // A command runs on the host: it sees only its own interface.
    let out = a.command("ip").args(["-o", "-4", "addr"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&a.ip().to_string()), "{text}");
    assert!(!text.contains(&b.ip().to_string()), "{text}");
}

#[test]
fn a_partition_blocks_both_ways_and_its_heal_restores_them() {
    let Some(net) = network(&["a", "b", "c"]) else {
        return;
    };
    let [a, b, c] = ["a", "b", "c"].map(|h| net.host(h).unwrap());
    let client = net.client().clone();
    let (on_a, on_b, on_c) = (echo_server(&a), echo_server(&b), echo_server(&c));
    // A connection made before the partition, to see it hang.
    let mut before = a.tcp_connect(on_b, WORKS).unwrap();
    before.set_read_timeout(Some(BLOCKED)).unwrap();

    let cut = net.partition(&[&a], &[&b, &client]).unwrap();
    assert_blocked(&net, &a, on_b);
    assert_blocked(&net, &b, on_a);
    assert_blocked(&net, &client, on_a);
    // Who is not cut off still talks.
    assert_reaches(&net, &a, on_c);
    assert_reaches(&net, &b, on_c);
    assert_reaches(&net, &client, on_b);
    before.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    let hung = before.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(hung.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "the established connection hangs rather than fails: {hung:?}"
    );

    net.heal(cut).unwrap();
    assert_reaches(&net, &a, on_b);
    assert_reaches(&net, &b, on_a);
    assert_reaches(&net, &client, on_a);
    // The hung connection resumes: TCP retransmits what waited.
    before
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    before.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    assert!(net.heal(cut).is_err(), "a fault heals once");
}

#[test]
fn a_one_way_partition_blocks_one_direction_only() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let [a, b] = ["a", "b"].map(|h| net.host(h).unwrap());
    let on_a = a.udp_bind(0).unwrap();
    let on_b = b.udp_bind(0).unwrap();
    for s in [&on_a, &on_b] {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
    }
    let cut = net.partition_one_way(&a, &b).unwrap();
    let received = |to: &UdpSocket, from: &UdpSocket| {
        let dest = to.local_addr().unwrap();
        // A few tries, for a first ARP exchange.
        (0..5).any(|_| {
            from.send_to(b"hello", dest).unwrap();
            let mut buf = [0u8; 16];
            to.recv_from(&mut buf)
                .is_ok_and(|(n, _)| &buf[..n] == b"hello")
        })
    };
    assert!(received(&on_a, &on_b), "b to a still flows");
    assert!(!received(&on_b, &on_a), "a to b is dropped");
    // TCP needs both ways: neither side can connect.
    let tcp_on_b = echo_server(&b);
    assert_blocked(&net, &a, tcp_on_b);

    net.heal(cut).unwrap();
    assert!(received(&on_b, &on_a), "a to b flows again");
    assert_reaches(&net, &a, tcp_on_b);
}

#[test]
fn a_rejecting_partition_fails_connections_at_once() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let [a, b] = ["a", "b"].map(|h| net.host(h).unwrap());
    let client = net.client().clone();
    let (on_a, on_b) = (echo_server(&a), echo_server(&b));
    let mut before = client.tcp_connect(on_a, WORKS).unwrap();

    let cut = net.partition_reject(&[&a], &[&b, &client]).unwrap();
    for (from, to) in [(&a, on_b), (&b, on_a), (&client, on_a)] {
        let started = Instant::now();
        let err = from.tcp_connect(to, WORKS).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{} to {to}: {err}",
            from.name()
        );
        assert!(started.elapsed() < WORKS);
    }
    // The established connection is reset when it next sends.
    before.set_read_timeout(Some(WORKS)).unwrap();
    let _ = before.write_all(b"ping");
    let mut buf = [0u8; 4];
    let err = before.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "{err:?}"
    );

    net.heal(cut).unwrap();
    assert_reaches(&net, &a, on_b);
    assert_reaches(&net, &client, on_a);
}

#[test]
fn a_downed_link_cuts_a_host_off_until_it_is_up_again() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let [a, b] = ["a", "b"].map(|h| net.host(h).unwrap());
    let on_a = echo_server(&a);
    let on_b = echo_server(&b);
    net.link_down(&a).unwrap();
    assert_blocked(&net, &b, on_a);
    assert_blocked(&net, &a, on_b);
    assert_reaches(&net, net.client(), on_b);
    net.link_up(&a).unwrap();
    assert_reaches(&net, &b, on_a);

    // heal_all brings links up too, and removes every other fault.
    net.link_down(&b).unwrap();
    let _cut = net.partition(&[&a], &[net.client()]).unwrap();
    net.heal_all().unwrap();
    assert_reaches(&net, &a, on_b);
    assert_reaches(&net, net.client(), on_a);
}

#[test]
fn loss_drops_a_share_of_a_hosts_packets() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let [a, b] = ["a", "b"].map(|h| net.host(h).unwrap());
    let on_b = b.udp_bind(0).unwrap();
    on_b.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let from_a = a.udp_bind(0).unwrap();
    let dest = on_b.local_addr().unwrap();
    // Warm up ARP so the count is about loss alone.
    from_a.send_to(b"x", dest).unwrap();
    let mut buf = [0u8; 8];
    on_b.recv_from(&mut buf).unwrap();

    let lossy = net.loss(&a, 50).unwrap();
    assert!(
        net.describe_faults().contains("numgen random mod 100 < 50"),
        "{}",
        net.describe_faults()
    );
    const SENT: usize = 400;
    for _ in 0..SENT {
        from_a.send_to(b"x", dest).unwrap();
    }
    let mut got = 0;
    while on_b.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    // Half are expected; these bounds are many standard deviations wide.
    assert!(
        (SENT / 5..SENT * 4 / 5).contains(&got),
        "{got} of {SENT} arrived with 50% loss"
    );

    net.heal(lossy).unwrap();
    for _ in 0..50 {
        from_a.send_to(b"x", dest).unwrap();
    }
    let mut got = 0;
    while on_b.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(got, 50, "no loss once healed");
}

#[test]
fn delay_holds_a_hosts_packets_back() {
    let Some(net) = network(&["a"]) else {
        return;
    };
    let a = net.host("a").unwrap();
    let on_a = echo_server(&a);
    let round_trip = || {
        let started = Instant::now();
        echo(net.client(), on_a, WORKS).unwrap();
        started.elapsed()
    };
    // Well before: a connect and an echo are two round trips.
    round_trip();

    const DELAY: Duration = Duration::from_millis(150);
    let slow = net.delay(&a, DELAY, Duration::ZERO).unwrap();
    let rules = net.describe_faults();
    assert!(rules.contains("NFQUEUE"), "{rules}");
    let delayed = round_trip();
    // A lower bound only: a loaded machine is slower, never faster.
    assert!(
        delayed >= DELAY * 2,
        "two round trips to a host delayed by {DELAY:?} took {delayed:?}"
    );
    net.heal(slow).unwrap();
    assert!(!net.describe_faults().contains("NFQUEUE"));
    round_trip();
    eprintln!("two round trips with {DELAY:?} of delay: {delayed:?}");
}

/// Namespaces and root-namespace links now, as `ip` lists them.
fn namespaces_and_links() -> String {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&ns.stdout),
        String::from_utf8_lossy(&links.stdout)
    )
}

fn wait_gone(names: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = namespaces_and_links();
        let left: Vec<_> = names
            .iter()
            .filter(|n| {
                now.contains(&format!("{n} "))
                    || now.contains(&format!("{n}\n"))
                    || now.contains(&format!("{n}@"))
            })
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}\n{now}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dropping_a_network_leaves_no_namespace_or_link() {
    let Some(net) = network(&["a", "b"]) else {
        return;
    };
    let a = net.host("a").unwrap();
    let _delay = net
        .delay(&a, Duration::from_millis(5), Duration::ZERO)
        .unwrap();
    let _cut = net.partition(&[&a], &[net.client()]).unwrap();
    let mut names = net.namespaces();
    names.push(net.root_leg().to_owned());
    let listed = namespaces_and_links();
    for n in &names {
        assert!(listed.contains(n.as_str()), "{n} missing from\n{listed}");
    }
    drop(net);
    wait_gone(&names);
}

#[test]
fn clean_run_removes_a_runs_leftovers_and_only_those() {
    if !require_netns() {
        return;
    }
    // A run of its own, so other tests' networks are never touched.
    let run = format!(
        "{}-clean-{}",
        boilerhouse_testkit::docker::test_run_id(),
        std::process::id()
    );
    let keep = Network::new(&["kept"]).unwrap();
    let leftover = Network::new_in_run(&run, &["a", "b"]).unwrap();
    let mut names = leftover.namespaces();
    names.push(leftover.root_leg().to_owned());
    // A test killed before its Drop ran leaves everything behind.
    std::mem::forget(leftover);
    assert_eq!(clean_run(&run), names.len());
    wait_gone(&names);
    assert_eq!(clean_run(&run), 0);
    // Another run's network is untouched and still works.
    let kept = keep.host("kept").unwrap();
    assert_reaches(&keep, keep.client(), echo_server(&kept));
}
