//! `envoy-docker resync`: register every running proxy (found by the
//! /proc scan in `procscan`) on that proxy's behalf, so a registrar that
//! lost its state (or started with `--no-recover`) learns them again.

use crate::mapping::Server;
use crate::procscan::{scan, Trust};
use crate::protocol::client;
use crate::protocol::{CallError, Owner, Registration, Reply, Request};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What `resync` needs: the registrar's socket, and another executable whose
/// processes may own mappings (as `serve --proxy-exe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub proxy_exe: Option<PathBuf>,
}

/// Why `resync` stopped before it was through.
pub type Error = client::Error;

/// Exit status 0 if every mapping was replayed, 2 if some were refused.
pub async fn run(args: Config) -> Result<ExitCode, Error> {
    let path = crate::addr::socket_path(args.socket);
    let mut conn = client::connect(&path, Duration::from_secs(2)).await?;
    let found = scan(&path, &Trust::new(args.proxy_exe.as_deref()));
    let mut refused = 0;
    for p in &found {
        let req = Request::Register(Registration {
            mapping: p.mapping,
            owner: Owner::Pid(p.pid),
            // Unknown from here; the proxy reports it once it registers
            // again by itself.
            server: Server::Relay,
        });
        match conn.call(&req).await? {
            Reply::Accepted => println!("replayed {} (pid {})", p.mapping, p.pid),
            Reply::Error(e) => {
                refused += 1;
                println!("refused {} (pid {}): {e}", p.mapping, p.pid)
            }
            other => return Err(CallError::BadAnswer(format!("{other:?}")).into()),
        }
    }
    println!(
        "resync: {} proxy mapping(s) found, {} replayed, {refused} refused",
        found.len(),
        found.len() - refused
    );
    Ok(if refused > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
