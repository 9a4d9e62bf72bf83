//! The dashboard in a real browser: Debian's Chromium, headless, driven
//! through chromedriver (`harness::browser`), against a real dockerd,
//! registrar and Envoy. The page is read through the DOM, as a user sees
//! it: the ids and classes are those of `src/registrar/dashboard/assets`.
//!
//! A screenshot of the main page is kept in `target/artefacts/`.

use crate::harness::browser::Browser;
use crate::harness::dockerd::{self, Engine, Setup, IMAGE};
use crate::harness::{free_port, http_get, http_get_with, Ads};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A label value that would run script if the page put it in as markup.
const XSS: &str = "<img src=x onerror=alert(1)>";

/// JavaScript for the row of the IPv4 mapping of host port `port`.
fn row(port: u16) -> String {
    format!("document.querySelector('#mappings-body tr[data-id=\"tcp_0-0-0-0_{port}\"]')")
}

/// JavaScript: the text of cell `class` in that row, or null.
fn cell(port: u16, class: &str) -> String {
    format!(
        "(() => {{ const r = {}; const c = r && r.querySelector('.{class}'); return c ? c.textContent.trim() : null; }})()",
        row(port)
    )
}

/// Where CI keeps what the tests leave for people to look at.
fn artefacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn dashboard_1_shows_mappings_traffic_envoy_restarts_and_stops_as_text() {
    let mut env = dockerd::shared();
    let (web, api) = (free_port(), free_port());
    let label = format!("ServiceName={XSS}");
    env.run(&[
        "-p",
        &format!("{web}:80"),
        "--name",
        "dash-web",
        "-l",
        &label,
        IMAGE,
    ]);
    let api_id = env.run(&["-p", &format!("{api}:80"), "--name", "dash-api", IMAGE]);

    let browser = Browser::start();
    browser.goto(&format!("http://{}/", env.stack.registrar_admin));
    // Both mappings, named after their containers, served by Envoy.
    for (port, name) in [(web, "dash-web"), (api, "dash-api")] {
        browser.wait_for(
            Duration::from_secs(10),
            &format!(
                "return {} === 'Envoy' && ({} || '').includes('{name}');",
                cell(port, "c-served .badge"),
                cell(port, "c-container")
            ),
        );
        let host = browser.execute(&format!("return {};", cell(port, "c-host")), json([]));
        assert_eq!(host, format!("0.0.0.0:{port}"));
    }

    // The label is shown as the characters it is, and ran nothing.
    let shown = browser.execute(&format!("return {};", cell(web, "c-service")), json([]));
    assert_eq!(shown, XSS);
    assert_eq!(
        browser.execute("return document.querySelectorAll('img').length;", json([])),
        0
    );
    assert_eq!(browser.alert_text(), None, "the label ran script");

    // A request loop on one port: its requests/s rise on the page.
    let stop = Arc::new(AtomicBool::new(false));
    let target = env.addr(api);
    let looping = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Bounded: it stops by itself after 30 s worth of requests.
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = http_get(target, "/");
            }
        })
    };
    let rate = browser.wait_for(
        Duration::from_secs(5),
        &format!(
            "const r = {}; const n = r && r.querySelector('.c-rqs .num'); \
             const v = n ? parseFloat(n.textContent) : 0; return v > 0 ? v : null;",
            row(api)
        ),
    );
    assert!(rate.as_f64().unwrap() > 0.0, "{rate}");
    // Each request is a new connection: the listener's stats count them.
    browser.wait_for(
        Duration::from_secs(5),
        &format!("return parseFloat({} || '0') > 0;", cell(api, "c-cxs")),
    );
    // Request times too, once Envoy has flushed its histograms (every 5 s).
    browser.wait_for(
        Duration::from_secs(15),
        &format!("return /[0-9]/.test({} || '');", cell(api, "c-lat")),
    );
    // What the README shows: the main page with live figures.
    browser.save_screenshot(&artefacts().join("dashboard.png"));
    stop.store(true, Ordering::Relaxed);
    looping.join().unwrap();

    // A mapping's page: its labels as text, and what Envoy holds of it.
    browser.goto(&format!(
        "http://{}/#/mapping/tcp_0-0-0-0_{web}",
        env.stack.registrar_admin
    ));
    browser.wait_for(
        Duration::from_secs(5),
        &format!(
            "const text = (id) => (document.getElementById(id) || {{}}).textContent || ''; \
             return text('mapping-labels').includes({}) \
               && text('mapping-listener').includes('\"tcp_0-0-0-0_{web}\"') \
               && text('mapping-events').includes('handover');",
            serde_json::to_string(XSS).unwrap()
        ),
    );
    assert_eq!(
        browser.execute("return document.querySelectorAll('img').length;", json([])),
        0
    );
    assert_eq!(browser.alert_text(), None);

    // Envoy killed: the page says the proxies relay; back to Envoy after
    // its restart.
    browser.goto(&format!("http://{}/", env.stack.registrar_admin));
    browser.wait_for(
        Duration::from_secs(5),
        &format!("return {} === 'Envoy';", cell(web, "c-served .badge")),
    );
    env.stack.kill_envoy();
    browser.wait_for(
        Duration::from_secs(2),
        &format!(
            "return {} === 'relay' && {} === 'relay';",
            cell(web, "c-served .badge"),
            cell(api, "c-served .badge")
        ),
    );
    env.stack.start_envoy(Ads::Sotw);
    browser.wait_for(
        Duration::from_secs(15),
        &format!(
            "return {} === 'Envoy' && {} === 'Envoy';",
            cell(web, "c-served .badge"),
            cell(api, "c-served .badge")
        ),
    );

    // docker stop: the row leaves.
    assert!(env.docker(&["stop", "-t", "1", &api_id]).status.success());
    browser.wait_for(
        Duration::from_secs(2),
        &format!("return {} === null;", row(api)),
    );
    assert!(browser.execute(&format!("return {} !== null;", row(web)), json([])) == true);
    assert_eq!(browser.alert_text(), None);
}

#[test]
fn dashboard_2_a_non_loopback_admin_answers_401_without_its_token() {
    // Docker 28's stack runs in a network namespace, its admin on the
    // namespace's address: not loopback, so it wants its token.
    let env = dockerd::shared_on(Setup::Firewalled(Engine::V28));
    let admin = env.stack.registrar_admin;
    assert!(!admin.ip().is_loopback());
    let token = env
        .stack
        .admin_token
        .clone()
        .expect("a token for a non-loopback admin");
    let h = free_port();
    env.run(&["-p", &format!("{h}:80"), "--name", "dash-28", IMAGE]);

    for path in ["/", "/api/v1/mappings", "/api/v1/overview", "/metrics"] {
        let r = http_get_with(admin, path, &[]).unwrap();
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert!(r
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")));
    }
    let bearer = format!("Bearer {token}");
    let r = http_get_with(admin, "/api/v1/mappings", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains(&format!("\"0.0.0.0:{h}\"")), "{}", r.body);

    // The browser, without the token, is refused: headless Chromium cancels
    // the Basic prompt and shows its error page, and says why in the console.
    let browser = Browser::start_reaching(&[admin.ip()]);
    browser.goto(&format!("http://{admin}/"));
    let mut seen = Vec::new();
    let refused = crate::harness::wait_until(Duration::from_secs(5), || {
        seen.extend(browser.console_log());
        seen.iter().any(|l| l.contains("status of 401"))
    });
    assert!(refused, "no 401 in the browser's console: {seen:?}");
    assert_eq!(
        browser.execute("return document.getElementById('mappings');", json([])),
        serde_json::Value::Null
    );
}

fn json<const N: usize>(args: [serde_json::Value; N]) -> serde_json::Value {
    serde_json::Value::Array(args.into())
}
