//! How Envoy serves every mapping beyond where its bytes go: how long auto
//! mode waits for a client's first bytes, and the limits an operator chose
//! with `serve` flags.
//!
//! The defaults add no limit that docker-proxy lacks: no idle timeout on
//! connections or streams, no request timeout, no cap on connections or
//! requests per container, and request headers up to Envoy's maximum. The
//! one thing a byte copier never does, waiting to see what a connection
//! speaks, is kept short (`DEFAULT_SNIFF`).

use std::time::Duration;

/// How long auto mode waits for a client to speak before it hands the
/// connection to tcp_proxy: the whole delay a server-first protocol (SMTP,
/// MySQL, FTP) sees before its banner goes out.
pub const DEFAULT_SNIFF: Duration = Duration::from_millis(200);

/// Envoy's ceiling for `max_request_headers_kb` (8 MiB).
pub const MAX_REQUEST_HEADERS_KB: u32 = 8192;

/// A header count high enough that only the size limit ever applies.
pub const MAX_HEADERS_COUNT: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Serving {
    /// Auto mode's wait for the first bytes (`--sniff-timeout`).
    pub sniff_timeout: Duration,
    /// Closes a connection with no traffic for this long, in both tcp_proxy
    /// and HTTP mode (`--idle-timeout`). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Resets an HTTP stream with no traffic for this long
    /// (`--stream-idle-timeout`). `None`: never.
    pub stream_idle_timeout: Option<Duration>,
    /// Ends an HTTP request that takes longer than this in all
    /// (`--request-timeout`). `None`: never.
    pub request_timeout: Option<Duration>,
    /// Connections and requests one container takes at once
    /// (`--max-connections`). `None`: as many as the host can hold.
    pub max_connections: Option<u32>,
    /// Largest request header block, in KiB (`--max-request-headers-kb`).
    pub max_request_headers_kb: u32,
}

impl Default for Serving {
    fn default() -> Serving {
        Serving {
            sniff_timeout: DEFAULT_SNIFF,
            idle_timeout: None,
            stream_idle_timeout: None,
            request_timeout: None,
            max_connections: None,
            max_request_headers_kb: MAX_REQUEST_HEADERS_KB,
        }
    }
}

/// Envoy's duration, where zero means "no timeout".
pub fn proto_duration(d: Option<Duration>) -> envoy_types::pb::google::protobuf::Duration {
    let d = d.unwrap_or(Duration::ZERO);
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h`, or `0`/`off`/`none` (no limit).
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if matches!(s, "0" | "off" | "none") {
        return Ok(None);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; use ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unit {unit:?} is not ms, s, m or h")),
    };
    // Envoy takes whole milliseconds and caps durations far below u64.
    if d > Duration::from_secs(315_576_000_000) {
        return Err(format!("{s:?} is too long"));
    }
    Ok(if d.is_zero() { None } else { Some(d) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_zero_means_off() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_duration("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("1h"), Ok(Some(Duration::from_secs(3600))));
        for off in ["0", "off", "none", "0s"] {
            assert_eq!(parse_duration(off), Ok(None), "{off}");
        }
        for bad in ["", "5", "s", "-1s", "1.5s", "3d", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let d = proto_duration(Some(Duration::from_millis(1500)));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
        assert_eq!(proto_duration(None).seconds, 0);
    }
}
