//! Who may read the admin address: anyone on loopback; elsewhere only a
//! caller with the token from `--admin-token-file`, sent as a bearer token
//! or as the password of HTTP Basic (which a browser asks for once, then
//! sends with every request of the page).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why the admin address cannot be served as asked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "--admin {addr} is not a loopback address: give --admin-token-file FILE, \
         so that only holders of its token can read the dashboard and API"
    )]
    Needed { addr: SocketAddr },
    #[error("--admin-token-file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--admin-token-file {}: the first line is empty", path.display())]
    Empty { path: PathBuf },
}

/// The token the admin address asks for; `None` serves everyone.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Option<String>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Token(set)"
        } else {
            "Token(none)"
        })
    }
}

impl Token {
    /// Serves everyone: for loopback.
    pub fn none() -> Token {
        Token(None)
    }

    /// Decides the token for an admin bound at `addr`: loopback needs
    /// none (a file given anyway is still read and used); any other
    /// address needs the file.
    pub fn for_addr(addr: SocketAddr, file: Option<&Path>) -> Result<Token, TokenError> {
        match file {
            Some(path) => read(path).map(|t| Token(Some(t))),
            None if addr.ip().is_loopback() => Ok(Token(None)),
            None => Err(TokenError::Needed { addr }),
        }
    }

    pub fn required(&self) -> bool {
        self.0.is_some()
    }

    /// True if `authorization` (the header's value, if any) carries the token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(want) = &self.0 else {
            return true;
        };
        let Some(given) = authorization.and_then(|h| std::str::from_utf8(h).ok()) else {
            return false;
        };
        let given = given.trim();
        let offered = if let Some(t) = strip_scheme(given, "Bearer") {
            t.trim().to_string()
        } else if let Some(b) = strip_scheme(given, "Basic") {
            match decode_base64(b.trim()).and_then(|v| String::from_utf8(v).ok()) {
                // Any user name; the password is the token.
                Some(pair) => match pair.split_once(':') {
                    Some((_, password)) => password.to_string(),
                    None => return false,
                },
                None => return false,
            }
        } else {
            return false;
        };
        same(offered.as_bytes(), want.as_bytes())
    }
}

/// Whether a request's `Host` header may be served without a token: a
/// loopback address or `localhost` (any port), or no header at all. This
/// keeps a tokenless loopback admin from DNS rebinding, where a page of
/// another site points its own name at 127.0.0.1 and reads the answers as
/// its own origin.
pub fn local_host(host: Option<&[u8]>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // [::1]:18001
        Some(rest) => match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn read(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// The rest of `header` after `scheme ` (the scheme in any case).
fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// Compares in time that depends on the lengths only, not on where the
/// first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64, as HTTP Basic uses it.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> Token {
        Token(Some(t.into()))
    }

    #[test]
    fn loopback_needs_no_token_and_other_addresses_need_the_file() {
        let lo: SocketAddr = "127.0.0.1:18001".parse().unwrap();
        let lo6: SocketAddr = "[::1]:18001".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:18001".parse().unwrap();
        assert!(!Token::for_addr(lo, None).unwrap().required());
        assert!(!Token::for_addr(lo6, None).unwrap().required());
        let e = Token::for_addr(any, None).unwrap_err();
        assert!(e.to_string().contains("--admin-token-file"), "{e}");
    }

    #[test]
    fn the_file_gives_its_first_line_and_an_empty_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("ed-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "s3cret \nignored\n").unwrap();
        let any: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let t = Token::for_addr(any, Some(&f)).unwrap();
        assert!(t.admits(Some(b"Bearer s3cret")));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            Token::for_addr(any, Some(&f)),
            Err(TokenError::Empty { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bearer_and_basic_carry_the_token_and_nothing_else_does() {
        let t = token("s3cret");
        assert!(t.admits(Some(b"Bearer s3cret")));
        assert!(t.admits(Some(b"bearer  s3cret ")));
        // "anyone:s3cret"
        assert!(t.admits(Some(b"Basic YW55b25lOnMzY3JldA==")));
        // ":s3cret"
        assert!(t.admits(Some(b"Basic OnMzY3JldA==")));
        assert!(!t.admits(None));
        assert!(!t.admits(Some(b"Bearer s3cre")));
        assert!(!t.admits(Some(b"Bearer s3cretX")));
        assert!(!t.admits(Some(b"s3cret")));
        // "s3cret" with no colon
        assert!(!t.admits(Some(b"Basic czNjcmV0")));
        assert!(!t.admits(Some(b"Basic !!!")));
        assert!(!t.admits(Some(&[0xff, 0xfe])));
        assert!(Token::none().admits(None));
    }

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in [
            &b"127.0.0.1:18001"[..],
            b"127.0.0.1",
            b"127.9.9.9:1",
            b"localhost:18001",
            b"LOCALHOST",
            b"[::1]:18001",
            b"[::1]",
        ] {
            assert!(local_host(Some(ok)), "{}", String::from_utf8_lossy(ok));
        }
        assert!(local_host(None));
        for bad in [
            &b"evil.example:18001"[..],
            b"evil.example",
            b"10.0.0.1:18001",
            b"localhost.evil.example",
            b"[::1",
            b"[fe80::1]:1",
            b"",
            &[0xff],
        ] {
            assert!(!local_host(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn base64_decodes_all_lengths() {
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("YWJj").unwrap(), b"abc");
        assert!(decode_base64("Y").is_none());
    }
}
