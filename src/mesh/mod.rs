//! The mesh's chain of trust and its names: what `ca init` and `ca host`
//! make, what `serve --mesh` loads and checks, and the leaf certificates
//! the registrar issues to each identity. No network I/O; the files are
//! read and written by the callers named below.
//!
//! - **Root** (`ca init`): an ECDSA P-256 key and a self-signed CA
//!   certificate for one trust domain, with the SAN `spiffe://TD`. It
//!   signs host intermediates only, and stays offline.
//! - **Host intermediate** (`ca host`): a CA limited to path length 0 and,
//!   by a critical name constraint, to URI names in the trust domain; SAN
//!   `spiffe://TD/host/<id>`. It is what a host's registrar signs with.
//! - **Leaf**: one per identity, `spiffe://TD/svc/<service>` or
//!   `spiffe://TD/host/<id>`, for both TLS server and client use; short
//!   lived (24 h by default) and renewed early (`renew_after`).
//!
//! `check` refuses at start what must never run: a key readable by
//! others, an intermediate that does not chain to the root, a certificate
//! out of its validity, a key that is not the certificate's.

pub mod ca;
pub mod check;

use std::time::Duration;

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<TrustDomain, MeshError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !ok {
            return Err(MeshError::BadName {
                what: "trust domain",
                value: s.into(),
            });
        }
        Ok(TrustDomain(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://TD`
    pub fn uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// The identity of a service: `spiffe://TD/svc/<service>`.
    pub fn service(&self, service: &str) -> String {
        format!("spiffe://{}/svc/{service}", self.0)
    }

    /// The identity of a host: `spiffe://TD/host/<id>`.
    pub fn host(&self, host_id: &str) -> String {
        format!("spiffe://{}/host/{host_id}", self.0)
    }

    /// The SNI a caller sends for `service`: `<service>.<TD>`.
    pub fn sni(&self, service: &str) -> String {
        format!("{service}.{}", self.0)
    }
}

/// A name that goes into a SPIFFE path segment (a service or host id):
/// letters, digits, `.`, `-`, `_`.
pub fn check_segment(what: &'static str, s: &str) -> Result<(), MeshError> {
    let ok = !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(MeshError::BadName {
            what,
            value: s.into(),
        })
    }
}

/// When a leaf issued now with lifetime `ttl` is renewed: at a point
/// between 60% and 90% of its life, `r` (in 0..1) saying where.
pub fn renew_after(ttl: Duration, r: f64) -> Duration {
    let r = if r.is_finite() {
        r.clamp(0.0, 1.0)
    } else {
        0.5
    };
    ttl.mul_f64(0.6 + 0.3 * r)
}

/// A uniformly random number in 0..1 from the system's generator.
pub fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // The system generator does not fail on Linux; if it did, the middle
    // of the window is as good a choice.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{what} {value:?} is not valid: use lower-case letters, digits, '.', '-' and '_'")]
    BadName { what: &'static str, value: String },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: String },
    #[error("{path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyExposed { path: String, mode: u32 },
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
    #[error("{0}")]
    Chain(String),
    #[error("cannot issue a certificate: {0}")]
    Issue(String),
}

impl From<rcgen::Error> for MeshError {
    fn from(e: rcgen::Error) -> MeshError {
        MeshError::Issue(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_identities() {
        let td = TrustDomain::parse("corp.example").unwrap();
        assert_eq!(td.service("web"), "spiffe://corp.example/svc/web");
        assert_eq!(td.host("h-1"), "spiffe://corp.example/host/h-1");
        assert_eq!(td.sni("web"), "web.corp.example");
        for bad in ["", "Corp", "a/b", "a b", "ü"] {
            assert!(TrustDomain::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_segment("service", "web-1_a.b").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b"] {
            assert!(check_segment("service", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn renewal_falls_between_sixty_and_ninety_percent() {
        let ttl = Duration::from_secs(100);
        assert_eq!(renew_after(ttl, 0.0), Duration::from_secs(60));
        assert_eq!(renew_after(ttl, 1.0), Duration::from_secs(90));
        assert_eq!(renew_after(ttl, f64::NAN), Duration::from_secs(75));
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r), "{r}");
            let at = renew_after(ttl, r);
            assert!(at >= Duration::from_secs(60) && at <= Duration::from_secs(90));
        }
    }
}
