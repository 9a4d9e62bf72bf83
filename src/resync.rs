//! `envoy-docker resync`: register every running proxy (found by the
//! /proc scan in `procscan`) on that proxy's behalf, so a registrar that
//! lost its state (or started with `--no-recover`) learns them again.

use crate::mapping::Server;
use crate::procscan::{scan, Trust};
use crate::protocol::client;
use crate::protocol::{Owner, Registration, Reply, Request};
use std::path::PathBuf;
use std::time::Duration;

/// What `resync` needs: the registrar's socket, and another executable whose
/// processes may own mappings (as `serve --proxy-exe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub proxy_exe: Option<PathBuf>,
}

pub fn run(args: Config) -> i32 {
    let path = crate::addr::socket_path(args.socket);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envoy-docker resync: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let mut conn = match client::connect(&path, Duration::from_secs(2)).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("envoy-docker resync: {e}");
                return 1;
            }
        };
        let found = scan(&path, &Trust::new(args.proxy_exe.as_deref()));
        let mut refused = 0;
        for p in &found {
            let req = Request::Register(Registration {
                mapping: p.mapping,
                owner: Owner::Pid(p.pid),
                // Unknown from here; the proxy reports it once it
                // registers again by itself.
                server: Server::Relay,
            });
            match conn.call(&req).await {
                Ok(Reply::Accepted) => {
                    println!("replayed {} (pid {})", p.mapping, p.pid)
                }
                Ok(Reply::Error(e)) => {
                    refused += 1;
                    println!("refused {} (pid {}): {e}", p.mapping, p.pid)
                }
                Ok(other) => {
                    eprintln!("envoy-docker resync: unexpected reply {other:?}");
                    return 1;
                }
                Err(e) => {
                    eprintln!("envoy-docker resync: {e}");
                    return 1;
                }
            }
        }
        println!(
            "resync: {} proxy mapping(s) found, {} replayed, {refused} refused",
            found.len(),
            found.len() - refused
        );
        if refused > 0 {
            2
        } else {
            0
        }
    })
}
