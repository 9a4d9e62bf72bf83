//! `ca`: the offline tools of the mesh's chain of trust.
//!
//! - `ca init --trust-domain TD --out DIR` writes a new root:
//!   `DIR/root.pem` and `DIR/root.key` (0600).
//! - `ca host --ca DIR --host-id ID --out DIR2 [--days N]` writes a host
//!   intermediate signed by that root: `DIR2/host.pem`, `DIR2/host.key`
//!   (0600), and a copy of `DIR2/root.pem`, which is what
//!   `serve --mesh DIR2` takes.
//!
//! Keys are never overwritten; the root's key is checked (private, its
//! certificate's own) before it signs anything.

use crate::mesh::check::{self, HOST_CERT, HOST_KEY, ROOT_CERT, ROOT_KEY};
use crate::mesh::{ca, MeshError, TrustDomain};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A root lasts ten years unless `--days` says; a host intermediate one.
pub const ROOT_DAYS: u32 = 3650;
pub const HOST_DAYS: u32 = 365;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Config {
    Init {
        trust_domain: TrustDomain,
        out: PathBuf,
        days: u32,
    },
    Host {
        ca: PathBuf,
        host_id: String,
        out: PathBuf,
        days: u32,
    },
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] MeshError);

fn write(path: &Path, text: &str, mode: u32, new_only: bool) -> Result<(), MeshError> {
    let io = |source| MeshError::Write {
        path: path.display().to_string(),
        source,
    };
    if new_only && path.exists() {
        return Err(MeshError::Exists {
            path: path.display().to_string(),
        });
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // `mode` applies only to a new file.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

fn make_dir(dir: &Path) -> Result<(), MeshError> {
    std::fs::create_dir_all(dir).map_err(|source| MeshError::Write {
        path: dir.display().to_string(),
        source,
    })
}

pub fn run(c: Config) -> Result<ExitCode, Error> {
    match c {
        Config::Init {
            trust_domain,
            out,
            days,
        } => {
            make_dir(&out)?;
            let key = out.join(ROOT_KEY);
            if key.exists() {
                return Err(MeshError::Exists {
                    path: key.display().to_string(),
                }
                .into());
            }
            let root = ca::root(&trust_domain, days)?;
            write(&key, &root.key_pem, 0o600, true)?;
            write(&out.join(ROOT_CERT), &root.cert_pem, 0o644, false)?;
            println!(
                "root of trust domain {} in {}; keep {} offline",
                trust_domain.as_str(),
                out.display(),
                key.display()
            );
        }
        Config::Host {
            ca: dir,
            host_id,
            out,
            days,
        } => {
            let (td, root_pem, root_key) = check::load_root(&dir)?;
            make_dir(&out)?;
            let key = out.join(HOST_KEY);
            if key.exists() {
                return Err(MeshError::Exists {
                    path: key.display().to_string(),
                }
                .into());
            }
            let host = ca::host(&root_pem, &root_key, &td, &host_id, days)?;
            write(&key, &host.key_pem, 0o600, true)?;
            write(&out.join(HOST_CERT), &host.cert_pem, 0o644, false)?;
            write(&out.join(ROOT_CERT), &root_pem, 0o644, false)?;
            // What serve will load must load.
            check::load_host(&out)?;
            println!(
                "intermediate for {} in {}, valid {days} days; start the host with \
                 `envoy-docker serve --mesh {}`",
                td.host(&host_id),
                out.display(),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
