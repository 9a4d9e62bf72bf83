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

/// Fails if `path` exists: a key is never written over.
fn refuse_existing(path: &Path) -> Result<(), MeshError> {
    if path.exists() {
        return Err(MeshError::Exists {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// Writes `text` to `path` with `mode`; with `new_only`, only as a new
/// file (O_EXCL), so a key that appeared meanwhile is not written over.
fn write(path: &Path, text: &str, mode: u32, new_only: bool) -> Result<(), MeshError> {
    let io = |source| MeshError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(mode);
    if new_only {
        open.create_new(true);
    } else {
        open.create(true).truncate(true);
    }
    let mut f = open.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => MeshError::Exists {
            path: path.display().to_string(),
        },
        _ => io(e),
    })?;
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
            // Before the work of making a key, not only when writing it.
            refuse_existing(&key)?;
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
            refuse_existing(&key)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_key_is_written_0600_and_never_over_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("ed-ca-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k.key");
        write(&key, "one", 0o600, true).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            write(&key, "two", 0o600, true),
            Err(MeshError::Exists { .. })
        ));
        assert!(matches!(
            refuse_existing(&key),
            Err(MeshError::Exists { .. })
        ));
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "one");
        // A certificate is replaced, with the mode asked for.
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "old and longer").unwrap();
        write(&cert, "new", 0o644, false).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "new");
        assert_eq!(std::fs::metadata(&cert).unwrap().mode() & 0o777, 0o644);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
