//! Live figures per mapping, from Envoy's stats.
//!
//! Why polling and not Envoy's `metrics_service` sink: a sink pushes every
//! stat of every listener at each flush, whether anyone looks or not,
//! while the dashboard must cost nothing when nobody watches. So the
//! sampler sleeps until a reader of `/api/v1/mappings` wakes it, then reads
//! `/stats?usedonly&filter=...` from Envoy's admin every 2 s (only the
//! few stats the dashboard shows, and only those Envoy has used), and goes
//! back to sleep [`WATCH_FOR`] after the last read, dropping its samples.
//!
//! Rates are the difference of two readings over the time between them.
//! Each mapping keeps a ring of [`HISTORY`] points, one per
//! [`HISTORY_STEP`] readings (5 minutes), so memory is bounded by the
//! number of mappings: about 400 bytes each.
//!
//! Stat names (see `xds::resources`): listener stats are named after the
//! listener's address (`listener.0.0.0.0_8080.`, `listener.[__]_8080.`),
//! HTTP and TCP proxy stats after the mapping's cluster (`http.<c>.`,
//! `tcp.<c>.`).

use super::super::keeper::{Read, Registrar};
use super::super::state::DashRow;
use super::envoy_admin;
use crate::addr::Addr;
use crate::mapping::{MappingKey, Mode};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How often Envoy's stats are read while someone watches: the issue asks
/// for at least every 2 s, and each reading costs Envoy a walk over all
/// its stats (tens of ms at 2,000 mappings).
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How long after the last read of the mappings the sampler goes on.
pub const WATCH_FOR: Duration = Duration::from_secs(30);
/// Points kept per mapping: 5 minutes.
pub const HISTORY: usize = 50;
/// Readings per point: 6 s at [`INTERVAL`].
pub const HISTORY_STEP: u32 = 3;

/// The stats the dashboard reads, and nothing else.
/// Listener stats are matched by their address part (`0.0.0.0_8080`,
/// `[__]_8080`), which leaves out the per-worker copies
/// (`listener.ADDR.worker_0.`).
pub const FILTER: &str = r"^(listener\.([0-9.]+|\[[^\]]*\])_[0-9]+\.downstream_cx_(total|active)|(http|tcp)\.[^.]+\.(downstream_rq_(total|2xx|4xx|5xx|time)|downstream_cx_(rx|tx)_bytes_total))$";

/// One mapping's figures now. `None` where Envoy cannot say.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub cx_active: u64,
    pub cx_per_s: f64,
    pub rq_per_s: Option<f64>,
    pub rq_2xx_per_s: Option<f64>,
    pub rq_4xx_per_s: Option<f64>,
    pub rq_5xx_per_s: Option<f64>,
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests/s (HTTP and auto) or new connections/s (TCP), oldest first.
    pub history: Vec<f32>,
}

/// How the sampler is doing, for the overview.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerState {
    /// False while Envoy's admin cannot be read.
    pub ok: bool,
    pub error: Option<String>,
    /// When the last good reading was taken (Unix ms).
    pub at_ms: Option<u64>,
}

impl Default for SamplerState {
    /// Not sampling (nobody watches) is no error.
    fn default() -> SamplerState {
        SamplerState {
            ok: true,
            error: None,
            at_ms: None,
        }
    }
}

/// What the sampler publishes after each reading.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub figures: HashMap<String, Figures>,
    pub state: SamplerState,
}

/// Who reads the figures: the API touches it; the sampler waits on it.
#[derive(Debug, Default)]
pub struct Viewers {
    /// Milliseconds since `epoch` of the last read, plus one (0: never).
    last: AtomicU64,
    wake: Notify,
    epoch: std::sync::OnceLock<Instant>,
}

impl Viewers {
    fn since_epoch(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(Instant::now);
        epoch.elapsed().as_millis() as u64 + 1
    }

    /// Someone is looking: sample (again) from now on. Always a wake-up:
    /// `Notify` keeps at most one for a sampler that is not waiting, which
    /// then only looks at the clock once more, so no touch is ever lost.
    pub fn touch(&self) {
        self.last.store(self.since_epoch(), Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn watched(&self) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last != 0 && self.since_epoch().saturating_sub(last) <= WATCH_FOR.as_millis() as u64
    }
}

/// One reading of Envoy's stats: counters and gauges by name, and the
/// (p50, p99) of each histogram over Envoy's last flush interval.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reading {
    pub values: HashMap<String, u64>,
    pub quantiles: HashMap<String, (Option<f64>, Option<f64>)>,
}

/// Parses Envoy's text stats: `name: 12` for counters and gauges, and
/// `name: P0(interval,cumulative) ... P50(a,b) ... P99(a,b) ...` for
/// histograms. Lines that are neither are skipped.
pub fn parse(text: &str) -> Reading {
    let mut r = Reading::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let value = value.trim();
        if let Ok(v) = value.parse::<u64>() {
            r.values.insert(name.to_string(), v);
        } else if value.starts_with('P') {
            let q = |want: &str| {
                value.split(' ').find_map(|part| {
                    let inner = part.strip_prefix(want)?.strip_prefix('(')?;
                    let interval = inner.split(',').next()?;
                    interval.parse::<f64>().ok().filter(|v| v.is_finite())
                })
            };
            r.quantiles.insert(name.to_string(), (q("P50"), q("P99")));
        }
    }
    r
}

/// The prefix of a mapping's listener stats, as Envoy names them after
/// the listener's address (colons of IPv6 become underscores).
pub fn listener_prefix(key: &MappingKey) -> String {
    match key.host_ip {
        std::net::IpAddr::V4(ip) => format!("listener.{ip}_{}", key.host_port),
        std::net::IpAddr::V6(ip) => {
            format!(
                "listener.[{}]_{}",
                ip.to_string().replace(':', "_"),
                key.host_port
            )
        }
    }
}

/// The figures of one mapping between two readings `secs` apart.
pub fn figures(row: &DashRow, old: &Reading, new: &Reading, secs: f64) -> Figures {
    let key = row.status.mapping.key;
    let l = listener_prefix(&key);
    let c = &row.cluster;
    let get = |r: &Reading, name: &str| r.values.get(name).copied().unwrap_or(0);
    // A counter that went down belongs to a restarted Envoy: count from 0.
    // Two decimals: enough to read, and short in the JSON.
    let rate = |name: &str| {
        let (a, b) = (get(old, name), get(new, name));
        let d = if b >= a { b - a } else { b };
        if secs > 0.0 {
            (d as f64 / secs * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let http = row.status.mode != Mode::Tcp;
    let rq = |class: &str| http.then(|| rate(&format!("http.{c}.downstream_rq_{class}")));
    let bytes = |dir: &str| {
        rate(&format!("http.{c}.downstream_cx_{dir}_bytes_total"))
            + rate(&format!("tcp.{c}.downstream_cx_{dir}_bytes_total"))
    };
    let (p50, p99) = match http {
        true => new
            .quantiles
            .get(&format!("http.{c}.downstream_rq_time"))
            .copied()
            .unwrap_or((None, None)),
        false => (None, None),
    };
    Figures {
        cx_active: get(new, &format!("{l}.downstream_cx_active")),
        cx_per_s: rate(&format!("{l}.downstream_cx_total")),
        rq_per_s: rq("total"),
        rq_2xx_per_s: rq("2xx"),
        rq_4xx_per_s: rq("4xx"),
        rq_5xx_per_s: rq("5xx"),
        rx_bytes_per_s: bytes("rx"),
        tx_bytes_per_s: bytes("tx"),
        p50_ms: p50,
        p99_ms: p99,
        history: Vec::new(),
    }
}

/// One mapping's history: points, and the sum of readings towards the next.
#[derive(Debug, Default)]
struct Series {
    points: VecDeque<f32>,
    sum: f64,
    readings: u32,
}

impl Series {
    fn add(&mut self, activity: f64) {
        self.sum += activity;
        self.readings += 1;
        if self.readings == HISTORY_STEP {
            if self.points.len() == HISTORY {
                self.points.pop_front();
            }
            let avg = self.sum / f64::from(HISTORY_STEP);
            // Two decimals are plenty for a sparkline, and keep the JSON short.
            self.points
                .push_back(((avg * 100.0).round() / 100.0) as f32);
            self.sum = 0.0;
            self.readings = 0;
        }
    }
}

/// The sampler's memory between readings.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Option<(Instant, Reading)>,
    series: HashMap<String, Series>,
}

impl Sampler {
    /// Takes in a reading for the mappings `rows`, and gives the figures of
    /// each (none before the second reading). Mappings that are gone lose
    /// their history.
    pub fn take(
        &mut self,
        at: Instant,
        reading: Reading,
        rows: &[DashRow],
    ) -> HashMap<String, Figures> {
        let mut out = HashMap::with_capacity(rows.len());
        let live: std::collections::HashSet<String> = rows
            .iter()
            .map(|r| r.status.mapping.key.resource_name())
            .collect();
        self.series.retain(|id, _| live.contains(id));
        if let Some((then, old)) = &self.last {
            let secs = at.duration_since(*then).as_secs_f64();
            for row in rows {
                let id = row.status.mapping.key.resource_name();
                let mut f = figures(row, old, &reading, secs);
                let activity = match row.status.mode {
                    Mode::Tcp => f.cx_per_s,
                    Mode::Http | Mode::Auto => f.rq_per_s.unwrap_or(0.0),
                };
                let s = self.series.entry(id.clone()).or_default();
                s.add(activity);
                f.history = s.points.iter().copied().collect();
                out.insert(id, f);
            }
        }
        self.last = Some((at, reading));
        out
    }

    /// Nobody watches: forget everything.
    fn clear(&mut self) {
        self.last = None;
        self.series.clear();
    }
}

/// Reads Envoy's stats while someone watches; publishes on `out`.
pub async fn run(
    envoy_admin: Addr,
    registrar: Registrar,
    viewers: Arc<Viewers>,
    out: watch::Sender<Arc<Live>>,
) {
    let path = format!(
        "/stats?usedonly&filter={}",
        super::super::docker::client::percent_encode(FILTER)
    );
    let mut sampler = Sampler::default();
    loop {
        if !viewers.watched() {
            sampler.clear();
            out.send_replace(Arc::new(Live::default()));
            viewers.wake.notified().await;
            continue;
        }
        let next = tokio::time::Instant::now() + INTERVAL;
        let text = envoy_admin::get(&envoy_admin, &path).await;
        let at = Instant::now();
        let Some(rows) = registrar.ask(Read::Dashboard).await else {
            return;
        };
        let live = match text {
            Ok(text) => Live {
                figures: sampler.take(at, parse(&text), &rows),
                state: SamplerState {
                    ok: true,
                    error: None,
                    at_ms: Some(super::super::state::journal::now_ms()),
                },
            },
            Err(e) => {
                // A restarted Envoy starts its counters again: no rate
                // across the gap.
                sampler.last = None;
                let previous = out.borrow().clone();
                Live {
                    figures: HashMap::new(),
                    state: SamplerState {
                        ok: false,
                        error: Some(e.to_string()),
                        at_ms: previous.state.at_ms,
                    },
                }
            }
        };
        out.send_replace(Arc::new(live));
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Backend, Mapping, MappingState, MappingStatus, Proto, Server};

    fn row(ip: &str, port: u16, mode: Mode) -> DashRow {
        let key = MappingKey {
            proto: Proto::Tcp,
            host_ip: ip.parse().unwrap(),
            host_port: port,
        };
        DashRow {
            status: MappingStatus {
                mapping: Mapping {
                    key,
                    backend: Backend {
                        container_ip: "172.17.0.2".parse().unwrap(),
                        container_port: 80,
                    },
                },
                mode,
                name: "web".into(),
                state: MappingState::Active,
                server: Server::Envoy,
                owner_pid: 1,
                container: None,
            },
            since_ms: 0,
            service: None,
            image: None,
            cluster: format!("web_{}", key.resource_name()),
        }
    }

    const OLD: &str = "\
listener.0.0.0.0_8080.downstream_cx_active: 1
listener.0.0.0.0_8080.downstream_cx_total: 10
http.web_tcp_0-0-0-0_8080.downstream_rq_total: 100
http.web_tcp_0-0-0-0_8080.downstream_rq_2xx: 90
http.web_tcp_0-0-0-0_8080.downstream_rq_5xx: 10
http.web_tcp_0-0-0-0_8080.downstream_cx_rx_bytes_total: 1000
tcp.web_tcp_0-0-0-0_8080.downstream_cx_rx_bytes_total: 500
";
    const NEW: &str = "\
listener.0.0.0.0_8080.downstream_cx_active: 3
listener.0.0.0.0_8080.downstream_cx_total: 14
http.web_tcp_0-0-0-0_8080.downstream_rq_total: 140
http.web_tcp_0-0-0-0_8080.downstream_rq_2xx: 126
http.web_tcp_0-0-0-0_8080.downstream_rq_4xx: 2
http.web_tcp_0-0-0-0_8080.downstream_rq_5xx: 12
http.web_tcp_0-0-0-0_8080.downstream_cx_rx_bytes_total: 3000
tcp.web_tcp_0-0-0-0_8080.downstream_cx_rx_bytes_total: 900
http.web_tcp_0-0-0-0_8080.downstream_rq_time: P0(1,0) P25(1.5,1) P50(2.5,2) P75(3,3) P90(4,4) P95(5,5) P99(9.5,9) P99.5(10,10) P99.9(11,11) P100(12,12)
listener.[__]_8080.downstream_cx_total: 7
garbage line
";

    #[test]
    fn envoy_text_stats_parse_into_counters_and_interval_quantiles() {
        let r = parse(NEW);
        assert_eq!(r.values["listener.0.0.0.0_8080.downstream_cx_total"], 14);
        assert_eq!(
            r.quantiles["http.web_tcp_0-0-0-0_8080.downstream_rq_time"],
            (Some(2.5), Some(9.5))
        );
        let empty = parse("h: P0(nan,1) P50(nan,2) P99(nan,3)\n");
        assert_eq!(empty.quantiles["h"], (None, None));
    }

    #[test]
    fn rates_come_from_two_readings_and_tcp_mode_has_no_request_rate() {
        let f = figures(
            &row("0.0.0.0", 8080, Mode::Auto),
            &parse(OLD),
            &parse(NEW),
            2.0,
        );
        assert_eq!(f.cx_active, 3);
        assert_eq!(f.cx_per_s, 2.0);
        assert_eq!(f.rq_per_s, Some(20.0));
        assert_eq!(f.rq_2xx_per_s, Some(18.0));
        assert_eq!(f.rq_4xx_per_s, Some(1.0));
        assert_eq!(f.rq_5xx_per_s, Some(1.0));
        assert_eq!(f.rx_bytes_per_s, 1200.0);
        assert_eq!(f.tx_bytes_per_s, 0.0);
        assert_eq!((f.p50_ms, f.p99_ms), (Some(2.5), Some(9.5)));
        let t = figures(
            &row("0.0.0.0", 8080, Mode::Tcp),
            &parse(OLD),
            &parse(NEW),
            2.0,
        );
        assert_eq!((t.rq_per_s, t.p99_ms), (None, None));
        assert_eq!(t.cx_per_s, 2.0);
        // A restarted Envoy: counters went down, and count from zero.
        let again = figures(
            &row("0.0.0.0", 8080, Mode::Http),
            &parse(NEW),
            &parse(OLD),
            1.0,
        );
        assert_eq!(again.rq_per_s, Some(100.0));
    }

    #[test]
    fn ipv6_listener_stats_are_found_under_envoys_name() {
        let r = row("::", 8080, Mode::Tcp);
        assert_eq!(listener_prefix(&r.status.mapping.key), "listener.[__]_8080");
        let f = figures(&r, &Reading::default(), &parse(NEW), 1.0);
        assert_eq!(f.cx_per_s, 7.0);
    }

    #[tokio::test]
    async fn a_touch_wakes_the_sampler_even_when_it_was_not_yet_waiting() {
        let v = Viewers::default();
        assert!(!v.watched(), "nobody has looked yet");
        v.touch();
        assert!(v.watched());
        // The wake-up was kept for a sampler that waits only now.
        tokio::time::timeout(Duration::from_secs(5), v.wake.notified())
            .await
            .expect("the touch was lost");
    }

    #[test]
    fn history_is_bounded_and_gone_mappings_are_forgotten() {
        let rows = vec![row("0.0.0.0", 8080, Mode::Http)];
        let mut s = Sampler::default();
        let t0 = Instant::now();
        assert!(
            s.take(t0, parse(OLD), &rows).is_empty(),
            "no rate from one reading"
        );
        let mut last = HashMap::new();
        for i in 1..=(HISTORY as u32 * HISTORY_STEP + 20) {
            let mut r = parse(OLD);
            let total = r
                .values
                .get_mut("http.web_tcp_0-0-0-0_8080.downstream_rq_total")
                .unwrap();
            *total += u64::from(i) * 10;
            last = s.take(t0 + Duration::from_secs(u64::from(i)), r, &rows);
        }
        let f = &last["tcp_0-0-0-0_8080"];
        assert_eq!(f.history.len(), HISTORY);
        assert_eq!(f.history.last().copied(), Some(10.0));
        s.take(t0 + Duration::from_secs(10_000), parse(OLD), &[]);
        assert!(s.series.is_empty());
    }
}
