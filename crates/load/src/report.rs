//! What a run measured: latency histograms per operation, answers by
//! status code, claims by source; printed as a table or written as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to a minute, to three
/// significant figures.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One kind of operation's answers.
#[derive(Debug)]
pub struct Operation {
    /// Client-observed latency of the answered calls, from the moment the
    /// call was sent. In the open loop the generator's own lateness (the
    /// time from a call's due moment to its send) is [`Report::lag`].
    pub client: Histogram<u64>,
    /// What the server reported it spent (claims only).
    pub server: Histogram<u64>,
    /// Answers by status code, named as tonic names them ("OK",
    /// "ResourceExhausted", ...): `dev/bench-claims` reads these names.
    pub answers: BTreeMap<String, u64>,
}

impl Default for Operation {
    fn default() -> Self {
        Self {
            client: histogram(),
            server: histogram(),
            answers: BTreeMap::new(),
        }
    }
}

impl Operation {
    /// Records one answer.
    pub fn record(&mut self, code: tonic::Code, client: Duration, server: Option<Duration>) {
        let name = if code == tonic::Code::Ok {
            "OK".to_owned()
        } else {
            format!("{code:?}")
        };
        *self.answers.entry(name).or_default() += 1;
        if code == tonic::Code::Ok {
            self.client.saturating_record(micros(client));
            if let Some(server) = server {
                self.server.saturating_record(micros(server));
            }
        }
    }

    fn ok(&self) -> u64 {
        self.answers.get("OK").copied().unwrap_or(0)
    }

    fn errors(&self) -> u64 {
        self.answers.values().sum::<u64>() - self.ok()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    /// "open loop at 1000/s" or "closed loop, concurrency 16".
    pub mode: String,
    /// How long it ran.
    pub elapsed: Duration,
    /// Claims.
    pub claim: Operation,
    /// Releases.
    pub release: Operation,
    /// Granted claims by source (POOL, EXISTING, ...).
    pub sources: BTreeMap<String, u64>,
    /// Open loop: cycles due while every tenant was busy, not sent.
    pub skipped: u64,
    /// Health checks one after another before the run: the floor.
    pub floor: Operation,
    /// Open loop: how late each claim was sent after its due moment, in
    /// microseconds. Tokio's timer has millisecond resolution and the
    /// generator shares the machine's cores, so this is the generator's
    /// error, shown beside the latency rather than hidden in it.
    pub lag: Histogram<u64>,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            mode: String::new(),
            elapsed: Duration::ZERO,
            claim: Operation::default(),
            release: Operation::default(),
            sources: BTreeMap::new(),
            skipped: 0,
            floor: Operation::default(),
            lag: histogram(),
        }
    }
}

impl Report {
    /// Records how late an open-loop call was sent.
    pub fn record_lag(&mut self, lag: Duration) {
        self.lag.saturating_record(micros(lag));
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
struct OperationJson {
    ok: u64,
    errors: u64,
    ok_per_second: f64,
    answers: BTreeMap<String, u64>,
    client_ms: Percentiles,
    server_ms: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
struct ReportJson {
    mode: String,
    elapsed_seconds: f64,
    claim: OperationJson,
    release: OperationJson,
    claim_sources: BTreeMap<String, u64>,
    skipped_all_tenants_busy: u64,
    floor_health_check: OperationJson,
    /// Open loop only.
    send_lag_ms: Option<Percentiles>,
}

impl Report {
    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn json_of(&self, op: &Operation, server: bool) -> OperationJson {
        OperationJson {
            ok: op.ok(),
            errors: op.errors(),
            ok_per_second: self.per_second(op.ok()),
            answers: op.answers.clone(),
            client_ms: Percentiles::of(&op.client),
            server_ms: server.then(|| Percentiles::of(&op.server)),
        }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(ReportJson {
            mode: self.mode.clone(),
            elapsed_seconds: self.elapsed.as_secs_f64(),
            claim: self.json_of(&self.claim, true),
            release: self.json_of(&self.release, false),
            claim_sources: self.sources.clone(),
            skipped_all_tenants_busy: self.skipped,
            floor_health_check: self.json_of(&self.floor, false),
            send_lag_ms: (!self.lag.is_empty()).then(|| Percentiles::of(&self.lag)),
        })
        .expect("a report serializes")
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{}, {:.1} s\n\n| what | ok | errors | ok/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.mode,
            self.elapsed.as_secs_f64()
        );
        let mut row = |what: &str, op: &Operation, h: &Histogram<u64>| {
            let p = Percentiles::of(h);
            // The floor ran before the run, one call at a time: its rate
            // says nothing.
            let rate = if std::ptr::eq(op, &self.floor) {
                "-".to_owned()
            } else {
                format!("{:.0}", self.per_second(op.ok()))
            };
            out.push_str(&format!(
                "| {what} | {} | {} | {rate} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                op.ok(),
                op.errors(),
                p.p50,
                p.p90,
                p.p99,
                p.p999,
                p.max
            ));
        };
        row("claim (client)", &self.claim, &self.claim.client);
        row("claim (server)", &self.claim, &self.claim.server);
        row("release (client)", &self.release, &self.release.client);
        row(
            "floor: health check, one at a time",
            &self.floor,
            &self.floor.client,
        );
        if !self.lag.is_empty() {
            let p = Percentiles::of(&self.lag);
            out.push_str(&format!(
                "| open loop: send lag behind schedule | {} | - | - | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                p.count, p.p50, p.p90, p.p99, p.p999, p.max
            ));
        }
        let answers = |op: &Operation| {
            op.answers
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!("\nclaim answers: {}\n", answers(&self.claim)));
        out.push_str(&format!("release answers: {}\n", answers(&self.release)));
        let sources: Vec<String> = self
            .sources
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        out.push_str(&format!("claims by source: {}\n", sources.join(", ")));
        if self.skipped > 0 {
            out.push_str(&format!(
                "skipped: {} cycles were due while every tenant was busy (add --tenants)\n",
                self.skipped
            ));
        }
        out
    }
}
