//! A real headless Chromium for the dashboard tests, driven through Debian's
//! `chromedriver` by a small blocking W3C WebDriver client.
//!
//! The tests need only a handful of WebDriver commands (new session, go to a
//! URL, run a script, screenshot, alert text, console log), so this speaks
//! HTTP/1.1 to chromedriver on loopback over `std::net` and `serde_json`
//! instead of pulling a WebDriver crate and its async stack into the build.
//!
//! Each `Browser` has its own chromedriver (in its own process group, which
//! Chromium joins) on a fresh port, and its own profile directory; dropping
//! it ends the session and kills the group.
//!
//! Chromium must reach nothing but loopback. Background networking is off,
//! but this Debian build still looks up Google and DuckDuckGo hosts (for its
//! third-party new-tab page, account and update checks), so the host
//! resolver is also told to resolve nothing: only 127.0.0.0/8, `localhost`
//! and `::1` are reachable, any other name or address fails to load.

use super::{dechunk, free_port, wait_until, TempDir};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Chromium's resolver answers "not found" for everything but loopback
/// (and the addresses a test adds).
const ONLY_LOOPBACK: &str =
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.*, EXCLUDE localhost, EXCLUDE ::1";

/// A WebDriver error answer: its `error` code and `message`.
#[derive(Debug)]
struct WdError {
    error: String,
    message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    dir: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; panics with the
    /// tail of chromedriver's log if either does not come up.
    pub fn start() -> Browser {
        Browser::start_reaching(&[])
    }

    /// The same, and Chromium may also reach `also` (addresses in network
    /// namespaces the test made).
    pub fn start_reaching(also: &[std::net::IpAddr]) -> Browser {
        let resolver: String = also.iter().fold(ONLY_LOOPBACK.to_string(), |rule, ip| {
            format!("{rule}, EXCLUDE {ip}")
        });
        let dir = TempDir::new("browser");
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // Empty: only loopback clients may connect.
            .arg("--allowed-ips=")
            .arg(format!(
                "--log-path={}",
                dir.path("chromedriver.log").display()
            ))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {CHROMEDRIVER} (apt install chromium-driver): {e}"));
        // Built before anything can fail, so that a panic below kills it.
        let mut b = Browser {
            driver,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            dir,
        };
        let ready = wait_until(Duration::from_secs(20), || {
            let up = matches!(request(b.addr, "GET", "/status", None),
                Ok((200, v)) if v["value"]["ready"] == true);
            up || !matches!(b.driver.try_wait(), Ok(None))
        });
        if !ready || !matches!(b.driver.try_wait(), Ok(None)) {
            panic!("chromedriver did not become ready; log:\n{}", b.log_tail());
        }
        let profile = format!("--user-data-dir={}", b.dir.path("profile").display());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Leave an alert open for `alert_text` to see; commands sent
            // while it is open fail with "unexpected alert open".
            "unhandledPromptBehavior": "ignore",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-default-apps",
                "--metrics-recording-only", "--password-store=basic",
                "--window-size=1920,1000",
                resolver, profile,
            ]},
        }}});
        match b.call("POST", "/session", Some(&caps)) {
            Ok(v) => b.session = v["sessionId"].as_str().unwrap_or_default().to_string(),
            Err(e) => panic!("new WebDriver session: {e}; log:\n{}", b.log_tail()),
        }
        assert!(
            !b.session.is_empty(),
            "no session id; log:\n{}",
            b.log_tail()
        );
        b
    }

    /// The last 40 lines of chromedriver's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One WebDriver command; `path` is relative to the session if it does
    /// not start with `/`. Returns the answer's `value`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, WdError> {
        let path = match path.strip_prefix('/') {
            Some(_) => path.to_string(),
            None => format!("/session/{}/{path}", self.session),
        };
        let (status, mut v) = request(self.addr, method, &path, body).map_err(|e| WdError {
            error: "transport".into(),
            message: format!("{method} {path}: {e}"),
        })?;
        let value = v["value"].take();
        match value["error"].as_str() {
            Some(error) if status >= 400 => Err(WdError {
                error: error.to_string(),
                message: value["message"].as_str().unwrap_or("").to_string(),
            }),
            _ => Ok(value),
        }
    }

    /// `call`, panicking on an error answer.
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.call(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// Navigates to `url` and waits for the page's load event.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(&json!({ "url": url })));
    }

    fn try_execute(&self, script: &str, args: &Value) -> Result<Value, WdError> {
        let args = if args.is_null() {
            json!([])
        } else {
            args.clone()
        };
        let body = json!({ "script": script, "args": args });
        self.call("POST", "execute/sync", Some(&body))
    }

    /// Runs `script` as the body of a function (so it must `return` its
    /// result) with `args` (a JSON array, or null) as its `arguments`.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.try_execute(script, &args)
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// Runs `script` until it returns something truthy (polled as
    /// `wait_until` polls), and returns that. A script that throws is
    /// retried; any other error, or `limit` passing, fails the test.
    pub fn wait_for(&self, limit: Duration, script: &str) -> Value {
        let mut found = None;
        let mut last = String::new();
        wait_until(limit, || match self.try_execute(script, &Value::Null) {
            Ok(v) if truthy(&v) => {
                found = Some(v);
                true
            }
            Ok(v) => {
                last = v.to_string();
                false
            }
            Err(e) if e.error == "javascript error" => {
                last = e.message;
                false
            }
            Err(e) => panic!("waiting on {script:?}: {e}"),
        });
        found.unwrap_or_else(|| panic!("after {limit:?}, {script:?} still gives {last}"))
    }

    fn string(&self, path: &str) -> String {
        let v = self.cmd("GET", path, None);
        v.as_str().unwrap_or_default().to_string()
    }

    pub fn title(&self) -> String {
        self.string("title")
    }

    /// The DOM serialized as HTML (not the bytes the server sent).
    pub fn page_source(&self) -> String {
        self.string("source")
    }

    /// The text of the open alert, confirm or prompt, if there is one.
    pub fn alert_text(&self) -> Option<String> {
        match self.call("GET", "alert/text", None) {
            Ok(v) => Some(v.as_str().unwrap_or_default().to_string()),
            Err(e) if e.error == "no such alert" => None,
            Err(e) => panic!("alert text: {e}"),
        }
    }

    pub fn dismiss_alert(&self) {
        self.cmd("POST", "alert/dismiss", Some(&json!({})));
    }

    /// The browser console's entries since the last call, as
    /// `LEVEL message` lines (a message starts with its source location).
    pub fn console_log(&self) -> Vec<String> {
        let v = self.cmd("POST", "se/log", Some(&json!({ "type": "browser" })));
        let entries = v.as_array().cloned().unwrap_or_default();
        entries
            .iter()
            .map(|e| {
                let level = e["level"].as_str().unwrap_or("?");
                format!("{level} {}", e["message"].as_str().unwrap_or(""))
            })
            .collect()
    }

    /// A PNG of the viewport.
    pub fn screenshot_png(&self) -> Vec<u8> {
        let v = self.cmd("GET", "screenshot", None);
        base64_decode(v.as_str().expect("screenshot is a base64 string"))
    }

    pub fn save_screenshot(&self, path: &Path) {
        std::fs::write(path, self.screenshot_png())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", "", None);
        }
        // Chromium and its helpers are in chromedriver's process group.
        let pgid = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

/// JavaScript truthiness of a script's result.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// One HTTP/1.1 request with a JSON body to chromedriver; returns (status,
/// parsed body). chromedriver keeps the connection open whatever the
/// request says, so the answer is framed by its Content-Length.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let (start, chunked) = loop {
        match framing(&raw) {
            Some((start, Some(len), _)) if raw.len() >= start + len => {
                raw.truncate(start + len);
                break (start, false);
            }
            Some((start, None, true)) if raw.ends_with(b"\r\n0\r\n\r\n") => break (start, true),
            _ => {}
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            // Closed: whatever came is the whole answer.
            let (start, _, chunked) = framing(&raw).ok_or_else(|| bad(format!("{raw:?}")))?;
            break (start, chunked);
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..start]);
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let text = String::from_utf8_lossy(&raw[start..]);
    let text = if chunked {
        dechunk(&text)
    } else {
        text.into_owned()
    };
    let value = match text.trim() {
        "" => Value::Null,
        t => serde_json::from_str(t).map_err(|e| bad(format!("{e}: {t}")))?,
    };
    Ok((status.ok_or_else(|| bad(head.to_string()))?, value))
}

/// Once `raw` holds a whole head: where the body starts, its Content-Length
/// if given, and whether it is chunked.
fn framing(raw: &[u8]) -> Option<(usize, Option<usize>, bool)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let (mut len, mut chunked) = (None, false);
    // chromedriver writes `Name:value`, with no space.
    for (name, value) in head.lines().skip(1).filter_map(|l| l.split_once(':')) {
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            len = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    Some((end + 4, len, chunked))
}

/// Standard base64 to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64: {e}"))
}

/// The dashboard's safety property, on a stand-in page: text that looks
/// like markup, put in with `textContent` under a strict CSP, shows as text
/// and runs nothing. Also proves the client: console capture, a positive
/// alert control, and a real PNG.
#[test]
fn browser_renders_text_not_markup() {
    use std::sync::{Arc, Mutex};

    const MARKUP: &str = "<img src=x onerror=alert(1)>";
    let page = "<!doctype html><title>probe</title><p id=out></p><script src=/app.js></script>";
    let app = format!(
        "document.getElementById('out').textContent = {MARKUP:?};\nconsole.log('rendered');"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let site = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = asked.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && matches!(conn.read(&mut byte), Ok(1)) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path.clone());
            let (status, kind, body) = match path.as_str() {
                "/" => ("200 OK", "text/html", page),
                "/app.js" => ("200 OK", "text/javascript", app.as_str()),
                "/favicon.ico" => ("200 OK", "image/x-icon", ""),
                _ => ("404 Not Found", "text/plain", ""),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                 Content-Security-Policy: default-src 'none'; script-src 'self'; img-src 'self'\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });

    let t = Instant::now();
    let b = Browser::start();
    eprintln!("chromedriver and session up in {:?}", t.elapsed());
    b.goto(&format!("http://{site}/"));
    assert_eq!(b.title(), "probe");
    let text = b.wait_for(
        Duration::from_secs(10),
        "return document.getElementById('out').textContent",
    );
    assert_eq!(text, MARKUP);
    let imgs = b.execute(
        "return document.querySelectorAll(arguments[0]).length",
        json!(["img"]),
    );
    assert_eq!(imgs, 0);
    assert!(b.page_source().contains("&lt;img src=x"));
    assert_eq!(b.alert_text(), None);
    assert!(
        !asked.lock().unwrap().iter().any(|p| p == "/x"),
        "{asked:?}"
    );
    let console = b.console_log();
    assert!(
        console.iter().any(|l| l.contains("rendered")),
        "{console:?}"
    );
    assert!(
        !console.iter().any(|l| l.starts_with("SEVERE")),
        "{console:?}"
    );

    // Names other than loopback fail in Chromium, without a DNS query.
    let far = b.call(
        "POST",
        "url",
        Some(&json!({"url": "http://example.invalid/"})),
    );
    assert!(
        matches!(&far, Err(e) if e.message.contains("ERR_NAME_NOT_RESOLVED")),
        "{far:?}"
    );
    b.goto(&format!("http://{site}/"));

    let png = b.screenshot_png();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{:?}",
        &png[..png.len().min(16)]
    );

    // The control: an alert that does run is seen.
    b.execute("setTimeout(() => alert('probe'), 0)", Value::Null);
    let open = || b.alert_text().is_some();
    assert!(wait_until(Duration::from_secs(5), open));
    assert_eq!(b.alert_text().as_deref(), Some("probe"));
    b.dismiss_alert();
    assert_eq!(b.alert_text(), None);
}
