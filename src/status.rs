//! `envoy-docker status`: asks the registrar for every mapping and prints
//! one row each, or the same data as JSON.

use crate::mapping::{EnvoyStatus, MappingStatus, Row};
use crate::protocol::client;
use crate::protocol::{CallError, Reply, Request};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Why `status` has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No registrar, none that answers, or not with what was asked for.
    #[error(transparent)]
    Registrar(#[from] client::Error),
    #[error("cannot write JSON")]
    Json(#[from] serde_json::Error),
}

fn unexpected(r: Reply) -> CallError {
    CallError::BadAnswer(format!("{r:?}"))
}

/// What `status` needs: the registrar's socket and the output form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub json: bool,
    /// List the fleet's catalog instead of the mappings.
    pub fleet: bool,
}

/// The fleet's catalog as the registrar holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FleetView {
    pub host_id: String,
    pub etcd: String,
    pub instances: Vec<crate::catalog::Row>,
    /// With `serve --mesh`: this host's identities and its mesh port's calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshView>,
}

/// This host's part of the mesh, as `status --fleet` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct MeshView {
    pub identities: Vec<crate::protocol::MeshIdentity>,
    pub calls: Vec<crate::protocol::MeshCall>,
}

/// Fetches the catalog from the registrar at `path`.
pub async fn fetch_fleet(path: &std::path::Path) -> Result<FleetView, client::Error> {
    let mut conn = client::connect(path, Duration::from_secs(2)).await?;
    let mut view = FleetView {
        host_id: String::new(),
        etcd: String::new(),
        instances: Vec::new(),
        mesh: None,
    };
    read_chunks(&mut conn, &Request::Fleet, |reply| match reply {
        Reply::Fleet {
            host_id,
            etcd,
            items,
            more,
        } => {
            view.host_id = host_id;
            view.etcd = etcd;
            view.instances.extend(items);
            Ok(more)
        }
        other => Err(unexpected(other)),
    })
    .await?;
    // A registrar without the mesh refuses; one older than the mesh does
    // not know the request and closes the connection.
    let mut mesh = MeshView::default();
    let asked = read_chunks(&mut conn, &Request::Mesh, |reply| match reply {
        Reply::Mesh {
            identities,
            calls,
            more,
        } => {
            mesh.identities.extend(identities);
            mesh.calls.extend(calls);
            Ok(more)
        }
        other => Err(unexpected(other)),
    })
    .await;
    view.mesh = asked.is_ok().then_some(mesh);
    Ok(view)
}

/// Sends `request` and reads its answer, frame by frame: `take` keeps each
/// frame's items and says whether more frames follow.
async fn read_chunks(
    conn: &mut crate::protocol::Connection<tokio::net::UnixStream>,
    request: &Request,
    mut take: impl FnMut(Reply) -> Result<bool, CallError>,
) -> Result<(), CallError> {
    let mut reply = conn.call(request).await?;
    loop {
        if let Reply::Error(e) = reply {
            return Err(CallError::Refused(e));
        }
        if !take(reply)? {
            return Ok(());
        }
        reply = conn.read_frame::<Reply>().await?.ok_or(CallError::Closed)?;
    }
}

pub fn render_fleet(v: &FleetView) -> String {
    let mut lines = vec![[
        "SERVICE".to_string(),
        "HOST".into(),
        "ADDRESS".into(),
        "HEALTH".into(),
        "MODE".into(),
        "SERVICE PORT".into(),
        "CONTAINER".into(),
    ]];
    for i in &v.instances {
        lines.push([
            i.service.clone(),
            i.host_id.clone(),
            i.address.clone(),
            i.health.clone(),
            i.mode.clone(),
            i.service_port.map_or("-".into(), |p| p.to_string()),
            i.container.clone(),
        ]);
    }
    let mut out = format!(
        "host {}; etcd {}; {} instance(s)\n\n",
        v.host_id,
        v.etcd,
        v.instances.len()
    );
    out.push_str(&columns(&lines));
    if let Some(m) = &v.mesh {
        out.push_str(&render_mesh(m));
    }
    out
}

/// The mesh's two tables: identities with their leaves, and calls to the
/// mesh port by service and caller.
fn render_mesh(m: &MeshView) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut ids = vec![[
        "IDENTITY".to_string(),
        "EXPIRES IN".into(),
        "LEAVES ISSUED".into(),
    ]];
    for i in &m.identities {
        let left = match i.expires.checked_sub(now) {
            Some(s) => span(s),
            None => "expired".into(),
        };
        ids.push([i.identity.clone(), left, i.issued.to_string()]);
    }
    let mut calls = vec![[
        "SERVICE".to_string(),
        "CALLER".into(),
        "HANDSHAKES".into(),
        "FAILED".into(),
        "DENIED".into(),
    ]];
    for c in &m.calls {
        calls.push([
            c.service.clone(),
            c.caller.clone(),
            c.handshakes.to_string(),
            c.failed.to_string(),
            c.denied.to_string(),
        ]);
    }
    format!(
        "\nmesh: {} identit{}\n\n{}\nmesh port: calls by service and caller\n\n{}",
        m.identities.len(),
        if m.identities.len() == 1 { "y" } else { "ies" },
        columns(&ids),
        columns(&calls)
    )
}

/// Seconds as the two largest units: `3d 4h`, `5h 12m`, `7m 30s`, `42s`.
fn span(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s / 3_600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {}s", s % 60),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Rows as left-aligned columns two spaces apart.
fn columns<const N: usize>(lines: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for l in lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn render_table(rows: &[Row]) -> String {
    let mut lines = vec![[
        "PROTO".to_string(),
        "HOST".into(),
        "CONTAINER".into(),
        "MODE".into(),
        "NAME".into(),
        "CONTAINER NAME".into(),
        "ID".into(),
        "STATE".into(),
        "SERVED BY".into(),
        "PID".into(),
    ]];
    for r in rows {
        let state = match &r.error {
            Some(e) => format!("failed: {e}"),
            None => r.state.clone(),
        };
        lines.push([
            r.proto.clone(),
            r.host.clone(),
            r.container.clone(),
            r.mode.clone(),
            r.name.clone(),
            r.container_name.clone().unwrap_or_else(|| "-".into()),
            r.container_id
                .as_deref()
                .map(|id| id.chars().take(12).collect())
                .unwrap_or_else(|| "-".into()),
            state,
            r.served_by.clone(),
            r.owner_pid.to_string(),
        ]);
    }
    columns(&lines)
}

/// Fetches every mapping, and the Envoy streams, from the registrar at
/// `path`.
pub async fn fetch(path: &std::path::Path) -> Result<Status, client::Error> {
    let mut conn = client::connect(path, Duration::from_secs(2)).await?;
    let envoys = match conn.call(&Request::Envoys).await? {
        Reply::Envoys(e) => e,
        Reply::Error(e) => return Err(CallError::Refused(e).into()),
        other => return Err(unexpected(other).into()),
    };
    let mut all = Vec::new();
    read_chunks(&mut conn, &Request::List, |reply| match reply {
        Reply::Mappings { items, more } => {
            all.extend(items);
            Ok(more)
        }
        other => Err(unexpected(other)),
    })
    .await?;
    // Asked last: a registrar older than the question closes the
    // connection on it, and the rest is known by then.
    let ports = match conn.call(&Request::Ports).await {
        Ok(Reply::Ports(p)) => Some(p),
        _ => None,
    };
    Ok(Status {
        mappings: all,
        envoys,
        ports,
    })
}

/// What `status` shows.
pub struct Status {
    pub mappings: Vec<MappingStatus>,
    pub envoys: Vec<EnvoyStatus>,
    /// `None` from a registrar that does not say (older than this).
    pub ports: Option<crate::nft::PortsState>,
}

pub async fn run(args: Config) -> Result<ExitCode, Error> {
    let path = crate::addr::socket_path(args.socket);
    if args.fleet {
        let v = fetch_fleet(&path).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", render_fleet(&v));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Status {
        mappings: all,
        envoys,
        ports,
    } = fetch(&path).await?;
    let rows: Vec<Row> = all.iter().map(Row::from).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_table(&rows));
        print!("{}", render_envoys(&envoys));
        match ports {
            Some(p) => println!("Published ports: {}", p.describe()),
            None => println!(
                "Published ports: the registrar does not say (it is older than this status)"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line on the Envoys, plus one per stalled stream.
pub fn render_envoys(envoys: &[EnvoyStatus]) -> String {
    let mut out = format!("\nEnvoys connected: {}\n", envoys.len());
    for e in envoys {
        if let Some(secs) = e.stalled_secs {
            out.push_str(&format!(
                "  stream {}: no ACK or NACK for {secs} s or more; not counted towards readiness\n",
                e.stream
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MeshCall, MeshIdentity};

    #[test]
    fn the_fleet_view_shows_the_mesh_when_there_is_one() {
        let mut v = FleetView {
            host_id: "host-a".into(),
            etcd: "up".into(),
            instances: Vec::new(),
            mesh: None,
        };
        assert!(!render_fleet(&v).contains("mesh"));
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3 * 3600
            + 120;
        v.mesh = Some(MeshView {
            identities: vec![
                MeshIdentity {
                    identity: "spiffe://td/svc/web".into(),
                    expires: soon,
                    issued: 4,
                },
                MeshIdentity {
                    identity: "spiffe://td/host/host-a".into(),
                    expires: 1,
                    issued: 1,
                },
            ],
            calls: vec![MeshCall {
                service: "web".into(),
                caller: "spiffe://td/host/host-c".into(),
                handshakes: 7,
                failed: 0,
                denied: 3,
            }],
        });
        let text = render_fleet(&v);
        assert!(text.contains("mesh: 2 identities"), "{text}");
        let web = text
            .lines()
            .find(|l| l.starts_with("spiffe://td/svc/web"))
            .unwrap();
        assert!(web.contains("3h ") && web.ends_with('4'), "{web}");
        assert!(text.contains("expired"), "{text}");
        let call = text.lines().find(|l| l.starts_with("web ")).unwrap();
        let cells: Vec<&str> = call.split_whitespace().collect();
        assert_eq!(cells, ["web", "spiffe://td/host/host-c", "7", "0", "3"]);
        assert_eq!(span(42), "42s");
        assert_eq!(span(90_000), "1d 1h");
    }
}
