//! Docker awareness: which container is behind each mapping, and so its
//! name and mode.
//!
//! Two paths, and neither may stall `docker run`:
//! - **At registration**, the container is still starting, and inspecting
//!   it would block until its proxies report (dockerd holds the container
//!   lock). Network inspect and the container list answer at once, so the
//!   registrar finds the container by its IP in `GET /networks/{id}` and
//!   reads its name and labels from `GET /containers/json?all=1`. The
//!   mapping is then named right before Envoy first serves it.
//! - **In the background**, the watcher lists running containers at start,
//!   then follows `/events`, and inspects a container only after its
//!   `start` event (or on `rename`, or a `health_status` change), when
//!   that is safe. This fills in every
//!   network address and the published ports, and catches containers that
//!   were running before the registrar.
//!
//! If Docker is unreachable, one warning is logged, mappings keep default
//! names, and the watcher retries in the background.

pub mod api;
pub mod client;
pub mod meta;

use super::keeper::{Input, Registrar};
use super::state::DockerReach;
use client::{percent_encode, Docker, DockerError};
use meta::ContainerMeta;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::timeout;

/// Bound on one Docker request from the watcher.
const REQUEST_BUDGET: Duration = Duration::from_secs(3);

/// Finds the (possibly still starting) container that has `ip`, without
/// inspecting it.
pub async fn lookup(docker: &Docker, ip: IpAddr) -> Result<Option<ContainerMeta>, DockerError> {
    let networks: Vec<api::NetworkSummary> = docker.get("/networks").await?;
    let ids = networks
        .into_iter()
        .filter(|n| !matches!(n.driver.as_str(), "host" | "null") && !n.id.is_empty())
        .map(|n| n.id);
    for id in ids {
        let net: api::Network = match docker.get(&format!("/networks/{id}")).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("{e}");
                continue;
            }
        };
        let Some(cid) = meta::container_with_ip(&net, ip) else {
            continue;
        };
        let filters = percent_encode(&format!(r#"{{"id":["{cid}"]}}"#));
        let list: Vec<api::ContainerSummary> = docker
            .get(&format!("/containers/json?all=1&filters={filters}"))
            .await?;
        let Some(item) = list.iter().find(|c| c.id == cid) else {
            return Ok(None);
        };
        let mut m = meta::from_list_item(item)?;
        m.ips.push(ip);
        return Ok(Some(m));
    }
    Ok(None)
}

async fn inspect(docker: &Docker, id: &str) -> Result<ContainerMeta, DockerError> {
    let v: api::ContainerInspect = timeout(
        REQUEST_BUDGET,
        docker.get(&format!("/containers/{}/json", percent_encode(id))),
    )
    .await
    .map_err(|_| DockerError::Timeout(format!("inspecting {id}")))??;
    meta::from_inspect(&v)
}

/// Runs the watcher; `synced` turns true after the first full listing, or
/// once it is clear that Docker cannot be reached.
pub async fn watch(docker: Arc<Docker>, registrar: Registrar, synced: watch::Sender<bool>) {
    let mut warned = false;
    let mut pause = Duration::from_millis(500);
    loop {
        match follow(&docker, &registrar, &synced).await {
            Ok(()) => {
                tracing::warn!("Docker closed its event stream; reconnecting");
                warned = false;
                pause = Duration::from_millis(500);
            }
            Err(e) if !warned => {
                registrar.tell(Input::DockerReach(DockerReach::Unreachable(e.to_string())));
                tracing::warn!(
                    "Docker at {} is unreachable ({e}); serving with default names and retrying",
                    docker.describe()
                );
                warned = true;
            }
            Err(e) => tracing::debug!("Docker still unreachable: {e}"),
        }
        let _ = synced.send(true);
        tokio::time::sleep(pause).await;
        // Short: a restarted dockerd's containers are named again within
        // seconds; a request to a local socket every 2 s costs nothing.
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One connection's worth of following Docker: events first (so nothing
/// between the listing and the stream is missed), then the listing.
async fn follow(
    docker: &Docker,
    registrar: &Registrar,
    synced: &watch::Sender<bool>,
) -> Result<(), DockerError> {
    let mut events = timeout(REQUEST_BUDGET, docker.events())
        .await
        .map_err(|_| DockerError::Timeout("GET /events".into()))??;
    let running: Vec<api::ContainerSummary> =
        timeout(REQUEST_BUDGET, docker.get("/containers/json"))
            .await
            .map_err(|_| DockerError::Timeout("GET /containers/json".into()))??;
    let ids: Vec<String> = running
        .into_iter()
        .map(|c| c.id)
        .filter(|id| !id.is_empty())
        .collect();
    for id in &ids {
        match inspect(docker, id).await {
            Ok(m) => registrar.tell(Input::Container(m)),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    tracing::info!(
        "Docker at {}: {} running container(s)",
        docker.describe(),
        ids.len()
    );
    let _ = synced.send(true);
    registrar.tell(Input::DockerReach(DockerReach::Following));
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        let action = ev.action();
        let Some(id) = ev.container() else {
            continue;
        };
        tracing::debug!("Docker event {action} for {id}");
        registrar.metrics().docker_event();
        match action {
            // "health_status: healthy" and the like; moby's filter matches
            // the part before the colon (daemon/events/filter.go).
            a if a == "start" || a == "rename" || a.starts_with("health_status") => {
                match inspect(docker, id).await {
                    Ok(m) => registrar.tell(Input::Container(m)),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            "die" | "destroy" => registrar.tell(Input::ForgetContainer(id.to_string())),
            _ => {}
        }
    }
    Ok(())
}
