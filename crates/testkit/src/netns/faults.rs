//! Faults on a [`Network`], each with its heal.
//!
//! Packet drops happen in the switch, as in a real network: nftables rules
//! (bridge family) in the switch namespace drop what crosses the bridge, so
//! the hosts' kernels see nothing but silence — a TCP connection across a
//! [`Network::partition`] hangs until a keepalive or a timeout notices, and
//! a new one times out. [`Network::partition_reject`] is the loud variant
//! (iptables `REJECT --reject-with tcp-reset` inside the hosts).
//! [`Network::link_down`] pulls a host's cable at the switch (the host sees
//! NO-CARRIER and keeps its address). [`Network::loss`] drops a share of a
//! host's packets at random (nft `numgen`). [`Network::delay`] holds every
//! packet a host sends for a while (see [`super::delay`]: this kernel has no
//! `sch_netem`).
//!
//! Every fault but a link's returns a [`Fault`] to [`Network::heal`];
//! [`Network::heal_all`] heals everything.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::delay::Delay;
use super::{Host, NFT_CHAIN, NFT_TABLE, Network, ip, nft_in, run};

/// A fault in force; [`Network::heal`] removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a fault stays until healed; keep it to heal it"]
pub struct Fault(u64);

/// The faults in force on a network.
#[derive(Default)]
pub(super) struct Faults {
    next: u64,
    active: Vec<(u64, Record)>,
    /// Hosts whose link is down.
    down: Vec<Host>,
}

/// What a fault changed, to undo it.
enum Record {
    /// nft rules in the switch, by handle.
    Nft(Vec<u64>),
    /// iptables rules (`-A` arguments) in a host's namespace.
    Iptables(Vec<(String, Vec<String>)>),
    /// Packets a host sends, held back.
    Delay(Delay),
}

impl Network {
    /// No packet between any host of `a` and any host of `b`, either way
    /// (dropped in the switch: connections hang).
    pub fn partition(&self, a: &[&Host], b: &[&Host]) -> anyhow::Result<Fault> {
        let mut rules = Vec::new();
        for x in a {
            for y in b {
                anyhow::ensure!(x != y, "{} is on both sides", x.name);
                rules.push(format!("ip saddr {} ip daddr {} drop", x.ip, y.ip));
                rules.push(format!("ip saddr {} ip daddr {} drop", y.ip, x.ip));
            }
        }
        self.add_nft(&rules)
    }

    /// No packet from `from` to `to`; the other way still flows. (TCP needs
    /// both ways: a connection either way stalls, but datagrams from `to`
    /// reach `from`.)
    pub fn partition_one_way(&self, from: &Host, to: &Host) -> anyhow::Result<Fault> {
        anyhow::ensure!(from != to, "a host cannot be cut off from itself");
        self.add_nft(&[format!("ip saddr {} ip daddr {} drop", from.ip, to.ip)])
    }

    /// Like [`Network::partition`], but loud: TCP between the sides is
    /// answered with a reset (connections fail at once), other packets are
    /// dropped. Made with iptables in the hosts' namespaces.
    pub fn partition_reject(&self, a: &[&Host], b: &[&Host]) -> anyhow::Result<Fault> {
        let mut rules: Vec<(String, Vec<String>)> = Vec::new();
        let mut add = |ns: &str, spec: &[&str]| {
            rules.push((
                ns.to_owned(),
                spec.iter().map(|s| (*s).to_owned()).collect(),
            ));
        };
        for x in a {
            for y in b {
                anyhow::ensure!(x != y, "{} is on both sides", x.name);
                for (me, other) in [(x, y), (y, x)] {
                    let Some(ns) = me.ns() else { continue };
                    let peer = other.ip.to_string();
                    // Resets pass (the other side's answer), the rest of
                    // TCP is answered with one, anything else dropped.
                    for chain in ["INPUT", "OUTPUT"] {
                        if chain == "OUTPUT" && other.ns().is_some() {
                            continue;
                        }
                        // The client's namespace is the machine's own:
                        // never touched, so this side answers for it both
                        // ways.
                        let dir = if chain == "INPUT" { "-s" } else { "-d" };
                        add(
                            ns,
                            &[
                                chain,
                                dir,
                                &peer,
                                "-p",
                                "tcp",
                                "--tcp-flags",
                                "RST",
                                "RST",
                                "-j",
                                "ACCEPT",
                            ],
                        );
                        add(
                            ns,
                            &[
                                chain,
                                dir,
                                &peer,
                                "-p",
                                "tcp",
                                "-j",
                                "REJECT",
                                "--reject-with",
                                "tcp-reset",
                            ],
                        );
                        add(ns, &[chain, dir, &peer, "-j", "DROP"]);
                    }
                }
            }
        }
        let mut applied = Vec::new();
        for (ns, spec) in rules {
            let result = iptables(&ns, "-A", &spec);
            applied.push((ns, spec));
            if let Err(e) = result {
                applied.pop();
                undo_iptables(&applied);
                return Err(e);
            }
        }
        Ok(self.record(Record::Iptables(applied)))
    }

    /// Pulls `host`'s cable at the switch: nothing reaches it or leaves it
    /// until [`Network::link_up`]. The host keeps its address and routes
    /// (it sees NO-CARRIER), so its connections hang as in a partition.
    pub fn link_down(&self, host: &Host) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &host.port, "down"])?;
        let mut faults = self.faults();
        if !faults.down.contains(host) {
            faults.down.push(host.clone());
        }
        Ok(())
    }

    /// Plugs `host`'s cable back in.
    pub fn link_up(&self, host: &Host) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &host.port, "up"])?;
        self.faults().down.retain(|h| h != host);
        Ok(())
    }

    /// Drops `percent` % of the packets `host` sends and, independently, of
    /// those sent to it.
    pub fn loss(&self, host: &Host, percent: u32) -> anyhow::Result<Fault> {
        anyhow::ensure!(
            (1..=100).contains(&percent),
            "loss is 1 to 100 %, not {percent}"
        );
        self.add_nft(&[
            format!(
                "ip saddr {} numgen random mod 100 < {percent} drop",
                host.ip
            ),
            format!(
                "ip daddr {} numgen random mod 100 < {percent} drop",
                host.ip
            ),
        ])
    }

    /// Holds every packet `host` sends for `delay` ± up to `jitter` (in
    /// order: jitter never reorders) before it goes out, so its round trip
    /// to anyone grows by that much. Not for the client leg.
    pub fn delay(&self, host: &Host, delay: Duration, jitter: Duration) -> anyhow::Result<Fault> {
        let ns = host
            .ns()
            .context("the client leg is the machine's own namespace: delay another host")?;
        let queue = {
            let faults = self.faults();
            // Queue numbers are per namespace; one per fault keeps them apart.
            u16::try_from(faults.next % 60_000).unwrap_or(0) + 1
        };
        let delayed = Delay::start(ns, queue, delay, jitter)?;
        Ok(self.record(Record::Delay(delayed)))
    }

    /// Removes one fault.
    pub fn heal(&self, fault: Fault) -> anyhow::Result<()> {
        let record = {
            let mut faults = self.faults();
            let index = faults
                .active
                .iter()
                .position(|(id, _)| *id == fault.0)
                .context("no such fault (healed already?)")?;
            faults.active.remove(index).1
        };
        self.undo(record)
    }

    /// Removes every fault and brings every link up.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        let (active, down) = {
            let mut faults = self.faults();
            (
                std::mem::take(&mut faults.active),
                std::mem::take(&mut faults.down),
            )
        };
        let mut first_error = None;
        for (_, record) in active {
            if let Err(e) = self.undo(record) {
                first_error.get_or_insert(e);
            }
        }
        for host in down {
            if let Err(e) = self.link_up(&host) {
                first_error.get_or_insert(e);
            }
        }
        // Whatever the records missed.
        if let Err(e) = self.nft_script(&format!("flush chain bridge {NFT_TABLE} {NFT_CHAIN}\n")) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The switch's fault rules and every host's iptables rules and links,
    /// as text: for failure messages.
    pub fn describe_faults(&self) -> String {
        let mut text = match nft_in(
            &self.switch,
            &format!("list chain bridge {NFT_TABLE} {NFT_CHAIN}\n"),
            false,
        ) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("nft: {e}\n"),
        };
        for host in self.hosts() {
            let Some(ns) = host.ns() else { continue };
            if let Ok(out) = run("ip", &["netns", "exec", ns, "iptables", "-S"]) {
                text.push_str(&format!(
                    "{} ({}) iptables:\n{}",
                    host.name,
                    host.ip,
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
        if let Ok(out) = ip(&["-n", &self.switch, "-br", "link"]) {
            text.push_str("switch ports:\n");
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        text
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, record: Record) -> Fault {
        let mut faults = self.faults();
        faults.next += 1;
        let id = faults.next;
        faults.active.push((id, record));
        Fault(id)
    }

    /// Adds rules to the switch's fault chain, all or none.
    fn add_nft(&self, rules: &[String]) -> anyhow::Result<Fault> {
        let script: String = rules
            .iter()
            .map(|r| format!("add rule bridge {NFT_TABLE} {NFT_CHAIN} {r}\n"))
            .collect();
        let out = nft_in(&self.switch, &script, true)?;
        let handles = parse_handles(&String::from_utf8_lossy(&out.stdout));
        if handles.len() != rules.len() {
            bail!(
                "nft echoed {} handles for {} rules:\n{}",
                handles.len(),
                rules.len(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(self.record(Record::Nft(handles)))
    }

    fn undo(&self, record: Record) -> anyhow::Result<()> {
        match record {
            Record::Nft(handles) => {
                let script: String = handles
                    .iter()
                    .map(|h| format!("delete rule bridge {NFT_TABLE} {NFT_CHAIN} handle {h}\n"))
                    .collect();
                self.nft_script(&script).map(drop)
            }
            Record::Iptables(rules) => {
                undo_iptables(&rules);
                Ok(())
            }
            Record::Delay(delay) => delay.stop(),
        }
    }
}

/// Stops what runs for a network's faults (delay threads), before its
/// namespaces go.
pub(super) fn stop_all(network: &Network) {
    let active = std::mem::take(&mut network.faults().active);
    for (_, record) in active {
        if let Record::Delay(delay) = record {
            let _ = delay.stop();
        }
    }
}

/// `iptables <op> <spec>` in namespace `ns`.
fn iptables(ns: &str, op: &str, spec: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns, "iptables", "-w", op];
    args.extend(spec.iter().map(String::as_str));
    run("ip", &args).map(drop)
}

fn undo_iptables(rules: &[(String, Vec<String>)]) {
    for (ns, spec) in rules.iter().rev() {
        let _ = iptables(ns, "-D", spec);
    }
}

/// The handles in `nft --echo --handle` output (`... # handle 7`).
fn parse_handles(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_handles;

    #[test]
    fn handles_come_from_nft_echo_output() {
        let echo = "add rule bridge bh faults ip saddr 10.64.1.10 ip daddr 10.64.1.11 drop # handle 4\n\
                    add rule bridge bh faults ip saddr 10.64.1.11 ip daddr 10.64.1.10 drop # handle 5\n";
        assert_eq!(parse_handles(echo), [4, 5]);
        assert!(parse_handles("").is_empty());
    }
}
