//! Latency without `sch_netem`: the kernel here has no netem qdisc
//! (`tc qdisc add ... netem` says "Specified qdisc kind is unknown"), but
//! it has iptables' NFQUEUE target. A rule in the host's namespace hands
//! every packet the host sends on `eth0` to a queue; a thread in that
//! namespace reads the queue over netlink (nfnetlink_queue) and lets each
//! packet go (`NF_ACCEPT`) once its delay has passed, in order.
//!
//! The rule has `--queue-bypass`, so packets flow unhindered when no thread
//! listens; stopping removes the rule first, then lets every held packet
//! go.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::run;

/// nfnetlink subsystem of the queue, and its messages and attributes
/// (linux/netfilter/nfnetlink_queue.h).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const AF_INET: u16 = 2;

/// Packets held back on one host; [`Delay::stop`] lets them go.
pub(super) struct Delay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    ns: String,
    rule: Vec<String>,
}

impl Delay {
    /// Holds every packet namespace `ns` sends on `eth0` for `delay` ± up
    /// to `jitter`, through NFQUEUE number `queue`.
    pub(super) fn start(
        ns: &str,
        queue: u16,
        delay: Duration,
        jitter: Duration,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let ns = ns.to_owned();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("delay-{queue}"))
                .spawn(move || {
                    let socket = match super::enter(&ns)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| bind_queue(queue))
                    {
                        Ok(socket) => {
                            let _ = ready_tx.send(Ok(()));
                            socket
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    hold(&socket, queue, delay, jitter, &stop)
                })?
        };
        ready_rx
            .recv()
            .context("the delay thread died before binding its queue")??;
        let rule: Vec<String> = [
            "OUTPUT",
            "-o",
            "eth0",
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue.to_string(),
            "--queue-bypass",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut me = Self {
            stop,
            thread: Some(thread),
            ns: ns.to_owned(),
            rule: Vec::new(),
        };
        iptables(ns, "-A", &rule)?;
        me.rule = rule;
        Ok(me)
    }

    /// Removes the rule and lets every held packet go.
    pub(super) fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        let removed = if self.rule.is_empty() {
            Ok(())
        } else {
            iptables(&self.ns, "-D", &std::mem::take(&mut self.rule))
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(result) => result?,
                Err(_) => bail!("the delay thread panicked"),
            }
        }
        removed
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn iptables(ns: &str, op: &str, spec: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns, "iptables", "-w", op];
    args.extend(spec.iter().map(String::as_str));
    run("ip", &args).map(drop)
}

/// A netlink socket bound to queue `queue`, copying packets' metadata only.
fn bind_queue(queue: u16) -> anyhow::Result<OwnedFd> {
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )
    .context("opening a netfilter netlink socket")?;
    rustix::net::bind(&socket, &SocketAddrNetlink::new(0, 0))?;
    let mut cmd = vec![NFQNL_CFG_CMD_BIND, 0];
    cmd.extend(AF_INET.to_be_bytes());
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    let requests: [&[(u16, &[u8])]; 3] = [
        &[(NFQA_CFG_CMD, &cmd)],
        &[(NFQA_CFG_PARAMS, &params)],
        &[(NFQA_CFG_QUEUE_MAXLEN, &8192u32.to_be_bytes())],
    ];
    for (seq, attrs) in (1u32..).zip(requests) {
        let message = nfq_message(
            NFQNL_MSG_CONFIG,
            queue,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            attrs,
        );
        send(&socket, &message)?;
        wait_ack(&socket, seq).with_context(|| format!("configuring NFQUEUE {queue}"))?;
    }
    Ok(socket)
}

fn send(socket: &OwnedFd, message: &[u8]) -> anyhow::Result<()> {
    rustix::net::sendto(
        socket,
        message,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )?;
    Ok(())
}

/// Reads until the kernel's answer to request `seq`; fails on an error.
fn wait_ack(socket: &OwnedFd, seq: u32) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, _) = rustix::net::recv(socket, &mut buf[..], RecvFlags::empty())?;
        for (kind, msg_seq, payload) in messages(&buf[..len]) {
            if kind == NLMSG_ERROR && msg_seq == seq {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(-1);
                if code == 0 {
                    return Ok(());
                }
                bail!(
                    "the kernel refused: {}",
                    std::io::Error::from_raw_os_error(-code)
                );
            }
        }
    }
}

/// The thread's loop: read packets, let each go when due, until `stop`.
fn hold(
    socket: &OwnedFd,
    queue: u16,
    delay: Duration,
    jitter: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut last_due = Instant::now();
    let mut rng = Instant::now().elapsed().subsec_nanos() as u64 | 1;
    let mut buf = vec![0u8; 65536];
    let mut seq = 100u32;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait = held
            .front()
            .map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let timeout = Timespec::try_from(wait).unwrap_or_default();
        let mut fds = [PollFd::new(socket, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            let len = match rustix::net::recv(socket, &mut buf[..], RecvFlags::DONTWAIT) {
                Ok((len, _)) => len,
                // Dropped notifications (the socket's buffer was full):
                // those packets go when the queue overflows, fail-open.
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::NOBUFS) => continue,
                Err(e) => return Err(e.into()),
            };
            let arrived = Instant::now();
            for (kind, _, payload) in messages(&buf[..len]) {
                if kind != (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) {
                    continue;
                }
                let Some(id) = packet_id(payload) else {
                    continue;
                };
                let spread = jitter_of(&mut rng, jitter);
                let due = (arrived + delay.saturating_sub(jitter) + spread).max(last_due);
                last_due = due;
                held.push_back((due, id));
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, id)) = held.pop_front() {
                seq = seq.wrapping_add(1);
                send(socket, &verdict(queue, seq, id))?;
            }
        }
    }
    for (_, id) in held {
        seq = seq.wrapping_add(1);
        send(socket, &verdict(queue, seq, id))?;
    }
    Ok(())
}

/// A random spread in [0, 2 × jitter], added to `delay - jitter`.
fn jitter_of(rng: &mut u64, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    // xorshift64
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let micros = u64::try_from(jitter.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(*rng % (2 * micros + 1))
}

fn verdict(queue: u16, seq: u32, id: u32) -> Vec<u8> {
    let mut body = NF_ACCEPT.to_be_bytes().to_vec();
    body.extend(id.to_be_bytes());
    nfq_message(
        NFQNL_MSG_VERDICT,
        queue,
        NLM_F_REQUEST,
        seq,
        &[(NFQA_VERDICT_HDR, &body)],
    )
}

/// The packet id in a packet message's attributes.
fn packet_id(payload: &[u8]) -> Option<u32> {
    // nfgenmsg (4 bytes), then attributes.
    let mut attrs = payload.get(4..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR {
            let id = attrs.get(4..8)?;
            return Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        }
        attrs = attrs.get(align(len)..).unwrap_or_default();
    }
    None
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// An nfnetlink queue message: nlmsghdr, nfgenmsg, attributes.
fn nfq_message(kind: u16, queue: u16, flags: u16, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![0u8, 0u8]; // AF_UNSPEC, NFNETLINK_V0
    body.extend(queue.to_be_bytes());
    for (kind, value) in attrs {
        let len = 4 + value.len();
        body.extend((len as u16).to_ne_bytes());
        body.extend(kind.to_ne_bytes());
        body.extend(*value);
        body.resize(align(body.len()), 0);
    }
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend(((16 + body.len()) as u32).to_ne_bytes());
    message.extend((NFNL_SUBSYS_QUEUE << 8 | kind).to_ne_bytes());
    message.extend(flags.to_ne_bytes());
    message.extend(seq.to_ne_bytes());
    message.extend(0u32.to_ne_bytes());
    message.extend(body);
    message
}

/// The netlink messages in a datagram: (type, seq, payload).
fn messages(mut data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        out.push((kind, seq, &data[16..len]));
        data = data.get(align(len)..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_the_parser() {
        let message = verdict(7, 42, 0xdead_beef);
        let parsed = messages(&message);
        assert_eq!(parsed.len(), 1);
        let (kind, seq, payload) = parsed[0];
        assert_eq!(kind, NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT);
        assert_eq!(seq, 42);
        assert_eq!(&payload[2..4], &7u16.to_be_bytes());

        // A packet message: a first attribute to skip, then the header.
        let mut header = 0x0102_0304u32.to_be_bytes().to_vec();
        header.extend([0x08, 0x00, 3]);
        let packet = nfq_message(
            NFQNL_MSG_PACKET,
            7,
            0,
            1,
            &[(9, &[1, 2, 3, 4, 5]), (NFQA_PACKET_HDR, &header)],
        );
        let parsed = messages(&packet);
        assert_eq!(packet_id(parsed[0].2), Some(0x0102_0304));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = 12345;
        for _ in 0..1000 {
            assert!(jitter_of(&mut rng, Duration::from_millis(10)) <= Duration::from_millis(20));
        }
        assert_eq!(jitter_of(&mut rng, Duration::ZERO), Duration::ZERO);
    }
}
