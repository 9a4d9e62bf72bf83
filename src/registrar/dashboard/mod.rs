//! The dashboard on the registrar's admin address: one page (`/`, with
//! `/app.js` and `/app.css`, compiled into the binary) and the read-only
//! JSON API it reads, `/api/v1/` (docs/api.md).
//!
//! - `api`: the JSON, built by plain functions from the registry's answers;
//! - `live`: figures per mapping from Envoy's stats, sampled only while
//!   someone reads them;
//! - `envoy_admin`: the small client for Envoy's admin endpoint;
//! - `auth`: the token a non-loopback admin address asks for.
//!
//! The admin server (`registrar::admin`) checks the token, adds the
//! security headers to every answer, and hands these paths here.

pub mod api;
pub mod auth;
pub mod envoy_admin;
pub mod live;

use super::keeper::{Read, Registrar};
use crate::addr::Addr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Everything the dashboard's answers come from. One per registrar.
pub struct Dashboard {
    pub registrar: Registrar,
    pub viewers: Arc<live::Viewers>,
    pub live: watch::Receiver<Arc<live::Live>>,
    pub envoy_admin: Addr,
    pub started: Instant,
    pub host_name: String,
}

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, Vec<u8>);

/// The page's files, compiled in.
const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

impl Dashboard {
    /// Starts the sampler; the dashboard is then ready to answer.
    pub fn start(
        registrar: Registrar,
        envoy_admin: Addr,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Arc<Dashboard> {
        let viewers = Arc::new(live::Viewers::default());
        let (tx, rx) = watch::channel(Arc::new(live::Live::default()));
        tasks.spawn(live::run(
            envoy_admin.clone(),
            registrar.clone(),
            viewers.clone(),
            tx,
        ));
        Arc::new(Dashboard {
            registrar,
            viewers,
            live: rx,
            envoy_admin,
            started: Instant::now(),
            host_name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
        })
    }

    /// The answer for `path`, or `None` if it is not the dashboard's.
    pub async fn answer(&self, path: &str) -> Option<Answer> {
        let file = |kind, text: &'static str| Some((200, kind, text.as_bytes().to_vec()));
        match path {
            "/" | "/index.html" => return file("text/html; charset=utf-8", INDEX),
            "/app.js" => return file("text/javascript; charset=utf-8", SCRIPT),
            "/app.css" => return file("text/css; charset=utf-8", STYLE),
            _ => {}
        }
        let api = path.strip_prefix("/api/v1/")?;
        let gone = Some((
            503,
            "text/plain",
            b"the registrar is shutting down\n".to_vec(),
        ));
        let value = match api {
            "overview" => {
                let Some(view) = self.registrar.ask(Read::Overview).await else {
                    return gone;
                };
                let host = api::Host {
                    name: &self.host_name,
                    uptime_secs: self.started.elapsed().as_secs(),
                    envoy_admin: self.envoy_admin.to_string(),
                };
                api::overview(&view, &host, &self.live.borrow().clone())
            }
            "mappings" => {
                self.viewers.touch();
                let Some(rows) = self.registrar.ask(Read::Dashboard).await else {
                    return gone;
                };
                let live = self.live.borrow().clone();
                return Some(json(&api::mappings(&rows, &live)));
            }
            "fleet" => {
                let (Some(view), Some(egress), Some(overview)) = (
                    self.registrar.ask(Read::Fleet).await,
                    self.registrar.ask(Read::Egress).await,
                    self.registrar.ask(Read::Overview).await,
                ) else {
                    return gone;
                };
                let mut v = api::fleet(view.as_ref(), &egress);
                let calls = self.registrar.metrics().mesh_calls();
                v["mesh"] = api::mesh(&overview.mesh, &calls, std::time::SystemTime::now());
                v
            }
            "events" => {
                let Some(events) = self.registrar.ask(Read::Events).await else {
                    return gone;
                };
                api::events(&events)
            }
            other => match other.strip_prefix("mappings/") {
                Some(id) if is_id(id) => {
                    let Some(found) = self
                        .registrar
                        .ask(|tx| Read::Detail(id.to_string(), tx))
                        .await
                    else {
                        return gone;
                    };
                    let Some(d) = found else {
                        return Some((404, "text/plain", b"no such mapping\n".to_vec()));
                    };
                    self.viewers.touch();
                    let held = self.held(id, &d.row.cluster).await;
                    let live = self.live.borrow().clone();
                    api::detail(&d, live.figures.get(id), &held)
                }
                _ => {
                    return Some((
                        404,
                        "text/plain",
                        b"not in /api/v1/ (see docs/api.md)\n".to_vec(),
                    ))
                }
            },
        };
        Some(json(&value))
    }

    /// What Envoy holds of one mapping: its listener, cluster and endpoints.
    async fn held(&self, listener: &str, cluster: &str) -> api::Held {
        let mut held = api::Held::default();
        let one = |resource: &str, name: &str| {
            format!(
                "/config_dump?include_eds&resource={resource}&name_regex={}",
                super::docker::client::percent_encode(&format!("^{name}$"))
            )
        };
        let asks = [
            one("dynamic_listeners", listener),
            one("dynamic_active_clusters", cluster),
            one("dynamic_endpoint_configs", cluster),
        ];
        // All three at once; each that fails says why in `error`, so that
        // `null` always means "Envoy does not hold it".
        let [l, c, e] = asks.map(|path| async move {
            match envoy_admin::get(&self.envoy_admin, &path).await {
                Ok(text) => api::first_config(&text).map_err(|e| format!("{path}: {e}")),
                Err(e) => Err(e.to_string()),
            }
        });
        let (l, c, e) = tokio::join!(l, c, e);
        let mut errors = Vec::new();
        for (slot, got) in [
            (&mut held.listener, l),
            (&mut held.cluster, c),
            (&mut held.endpoints, e),
        ] {
            match got {
                Ok(v) => *slot = v,
                Err(e) if !errors.contains(&e) => errors.push(e),
                Err(_) => {}
            }
        }
        if !errors.is_empty() {
            held.error = Some(errors.join("; "));
        }
        held
    }
}

/// Mapping ids are resource names: `[A-Za-z0-9_-]` only, so one can go
/// into Envoy's `name_regex` as it is.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn json(v: &impl serde::Serialize) -> Answer {
    match serde_json::to_vec(v) {
        Ok(body) => (200, "application/json", body),
        Err(e) => (500, "text/plain", e.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_resource_names_only() {
        assert!(super::is_id("tcp_0-0-0-0_8080"));
        assert!(!super::is_id(""));
        assert!(!super::is_id("tcp_0.0.0.0_8080"));
        assert!(!super::is_id("a$|.*"));
    }

    #[test]
    fn the_page_loads_only_its_own_script_and_style_and_has_no_inline_script() {
        let page = super::INDEX;
        assert!(page.contains(r#"src="/app.js""#), "{page}");
        assert!(page.contains(r#"href="/app.css""#), "{page}");
        // Every <script> has a src: nothing inline for the CSP to refuse.
        for part in page.split("<script").skip(1) {
            let tag = &part[..part.find('>').unwrap()];
            assert!(tag.contains("src="), "inline script: {part}");
        }
        assert!(!page.contains("http://") && !page.contains("https://"));
        // Nothing from elsewhere (SVG's namespace is a name, not a load).
        for file in [super::SCRIPT, super::STYLE] {
            let file = file.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!file.contains("http://") && !file.contains("https://"));
        }
        // Data goes into the page as text, never as markup.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!super::SCRIPT.contains(sink), "{sink} in app.js");
        }
    }
}
