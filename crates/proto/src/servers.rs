//! A client's list of server addresses and which one to try next: the
//! leader-following of agents and `bh`, as a pure state machine so that
//! every path through it is tested without a network.
//!
//! A client tries its addresses in rounds. A round tries each address at
//! most once: on a failure it moves to the next listed address, at once;
//! when a standby refuses and names the leader ([`crate::leader`]), it goes
//! to the leader next. When every listed address has been tried the round
//! is over: an agent waits its jittered backoff and starts another, `bh`
//! gives up. Waiting per round rather than per address lets a client find
//! the leader among three replicas in three quick attempts, while a cluster
//! that is down costs it one attempt per address per backoff.
//!
//! A new round starts at the leader last named (or served), unless it has
//! failed since, else at the next address in the list, so a dead replica
//! is not always tried first.

/// The addresses of a `--server` value list: each value may name several,
/// comma-separated, so a repeated flag and a comma-separated environment
/// variable mean the same. Blanks are dropped, a trailing `/` is trimmed
/// and a repeated address is kept once.
pub fn split_addresses<S: AsRef<str>>(values: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in values {
        for addr in value.as_ref().split(',').map(normalise) {
            if !addr.is_empty() && !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// One spelling of an address, so a leader's hint matches the list entry
/// it names.
fn normalise(addr: &str) -> String {
    addr.trim().trim_end_matches('/').to_owned()
}

/// Checks that `addresses` (of the flag `field`) are http:// or https://
/// URLs, all of one scheme, since one set of TLS settings applies to every
/// address. Returns whether they are https.
pub fn check_schemes(field: &str, addresses: &[String]) -> Result<bool, String> {
    let first = addresses
        .first()
        .ok_or_else(|| format!("{field} names no server address"))?;
    for addr in addresses {
        if scheme(addr).is_none() {
            return Err(format!(
                "{field} {addr:?} is not an http:// or https:// address"
            ));
        }
    }
    let https = scheme(first) == Some(Scheme::Https);
    if let Some(other) = addresses
        .iter()
        .find(|a| (scheme(a) == Some(Scheme::Https)) != https)
    {
        return Err(format!(
            "{field} mixes https:// and http:// addresses ({first} and {other}); the TLS settings apply to every address, so give all of one kind"
        ));
    }
    Ok(https)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// The scheme of a plausible URL: something after `://`, and nothing a
/// header value or a list would not carry.
fn scheme(addr: &str) -> Option<Scheme> {
    let (scheme, rest) = addr.split_once("://")?;
    if rest.is_empty() || rest.contains(|c: char| c.is_whitespace() || c == ',') {
        return None;
    }
    match scheme {
        "http" => Some(Scheme::Http),
        "https" => Some(Scheme::Https),
        _ => None,
    }
}

/// How an attempt on the current address went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// It could not be reached, or failed before it served anything.
    Failed,
    /// A standby refused, naming the leader if it knows one.
    Refused(Option<&'a str>),
    /// It served (an agent's session was welcomed) and has now stopped,
    /// naming a leader if it stopped with a standby's refusal.
    Ended(Option<&'a str>),
}

impl<'a> Outcome<'a> {
    fn hint(self) -> Option<&'a str> {
        match self {
            Outcome::Failed => None,
            Outcome::Refused(hint) | Outcome::Ended(hint) => hint,
        }
    }
}

/// What to do after an outcome; either way [`Rotation::current`] is the
/// address to try next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try it now: the round goes on.
    Now,
    /// Every address was tried this round: back off first (an agent) or
    /// give up (`bh`).
    Wait,
}

/// Which server to try next; see the module documentation.
#[derive(Debug, Clone)]
pub struct Rotation {
    listed: Vec<String>,
    https: bool,
    current: String,
    /// The listed address the rotation goes on from.
    cursor: usize,
    /// Addresses tried in this round.
    tried: Vec<String>,
    /// Unlisted leaders followed in this round: at most one per listed
    /// address, so hints that name ever new addresses still end the round.
    detours: usize,
    /// The leader last named or served, until it fails: where the next
    /// round starts.
    leader: Option<String>,
}

impl Rotation {
    /// Starts at the first of `listed` (from [`split_addresses`], checked
    /// by [`check_schemes`]).
    ///
    /// # Panics
    ///
    /// If `listed` is empty.
    pub fn new(listed: Vec<String>) -> Self {
        assert!(!listed.is_empty(), "a rotation needs an address");
        let https = scheme(&listed[0]) == Some(Scheme::Https);
        Self {
            current: listed[0].clone(),
            listed,
            https,
            cursor: 0,
            tried: Vec::new(),
            detours: 0,
            leader: None,
        }
    }

    /// The address to try now.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// The configured addresses.
    pub fn listed(&self) -> &[String] {
        &self.listed
    }

    /// Starts a fresh round at the current address: `bh` does so for each
    /// call, so one call never tries an address twice and the next call
    /// starts where the last one was answered.
    pub fn begin(&mut self) {
        self.tried.clear();
        self.detours = 0;
    }

    /// Whether a leader hint may be followed: a listed address, or another
    /// of the list's scheme.
    ///
    /// An unlisted leader is followed so that a client configured with a
    /// stable subset of the replicas (or one name in front of them) still
    /// reaches a leader that came up elsewhere. That adds no trust: the
    /// hint comes from a server of the installation, and over https every
    /// address is verified against the same CA and server name as the
    /// listed ones, so a host outside the installation cannot pose as the
    /// leader (over plain http any host can pose as any listed one
    /// anyway). Another scheme is refused: http from an https list would
    /// drop TLS, and https from an http list has no CA to verify against.
    pub fn accepts(&self, hint: &str) -> bool {
        let hint = normalise(hint);
        self.listed.contains(&hint)
            || scheme(&hint).is_some_and(|s| (s == Scheme::Https) == self.https)
    }

    /// Records how the attempt on [`Rotation::current`] went and moves to
    /// the address to try next.
    pub fn record(&mut self, outcome: Outcome<'_>) -> Step {
        if let Outcome::Ended(_) = outcome {
            // It served us, so it led a moment ago, and a new round begins
            // with its loss: every other address gets a try before the
            // backoff.
            self.begin();
            self.leader = Some(self.current.clone());
        } else if self.leader.as_ref() == Some(&self.current) {
            // The leader we knew of is down or no longer leads: the next
            // round starts by the list again, unless a hint says otherwise.
            self.leader = None;
        }
        let hint = outcome.hint();
        let current = self.current.clone();
        if !self.tried.contains(&current) {
            self.tried.push(current);
        }
        if let Some(hint) = hint.filter(|h| self.accepts(h)).map(normalise) {
            self.leader = Some(hint.clone());
            if !self.tried.contains(&hint) {
                match self.listed.iter().position(|a| *a == hint) {
                    Some(i) => {
                        self.cursor = i;
                        self.current = hint;
                        return Step::Now;
                    }
                    None if self.detours < self.listed.len() => {
                        self.detours += 1;
                        self.current = hint;
                        return Step::Now;
                    }
                    None => {}
                }
            }
        }
        let n = self.listed.len();
        if let Some(i) = (1..=n)
            .map(|k| (self.cursor + k) % n)
            .find(|&i| !self.tried.contains(&self.listed[i]))
        {
            self.cursor = i;
            self.current = self.listed[i].clone();
            return Step::Now;
        }
        // The round is over; the next one starts at the leader last named,
        // else where the rotation stands.
        self.begin();
        match self.leader.clone() {
            Some(leader) => {
                if let Some(i) = self.listed.iter().position(|a| *a == leader) {
                    self.cursor = i;
                }
                self.current = leader;
            }
            None => {
                self.cursor = (self.cursor + 1) % n;
                self.current = self.listed[self.cursor].clone();
            }
        }
        Step::Wait
    }
}

#[cfg(test)]
#[path = "servers_tests.rs"]
mod tests;
