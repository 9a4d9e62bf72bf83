//! Loading and checking the mesh's files with `x509-parser`: a host's
//! directory for `serve --mesh`, and the root's for `ca host`.
//!
//! A host directory holds `host.pem` (the intermediate), `host.key` (its
//! key, mode 0600) and `root.pem` (the fleet's root, the trust bundle).
//! A root directory holds `root.pem` and `root.key`.

use super::ca::Signer;
use super::{MeshError, TrustDomain};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

pub const ROOT_CERT: &str = "root.pem";
pub const ROOT_KEY: &str = "root.key";
pub const HOST_CERT: &str = "host.pem";
pub const HOST_KEY: &str = "host.key";

/// A host's signing authority, checked.
#[derive(Debug)]
pub struct HostCa {
    pub trust_domain: TrustDomain,
    pub host_id: String,
    /// The root certificate, PEM: what peers are checked against.
    pub root_pem: String,
    pub signer: Signer,
    /// When the intermediate itself expires.
    pub not_after: SystemTime,
}

fn read(path: &Path) -> Result<String, MeshError> {
    std::fs::read_to_string(path).map_err(|source| MeshError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a private key, refusing one that group or others may read.
pub fn read_key(path: &Path) -> Result<String, MeshError> {
    let meta = std::fs::metadata(path).map_err(|source| MeshError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MeshError::KeyExposed {
            path: path.display().to_string(),
            mode,
        });
    }
    read(path)
}

fn bad(path: &Path, why: impl std::fmt::Display) -> MeshError {
    MeshError::Bad {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// One certificate's DER from a PEM file's first block.
fn der(path: &Path, pem: &str) -> Result<Vec<u8>, MeshError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad(path, format!("not a PEM certificate: {e}")))?;
    if p.label != "CERTIFICATE" {
        return Err(bad(
            path,
            format!("holds a {:?}, not a CERTIFICATE", p.label),
        ));
    }
    Ok(p.contents)
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, MeshError> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(path, format!("not an X.509 certificate: {e}")))?;
    Ok(c)
}

/// The URI names of a certificate's SAN.
pub fn uris<'a>(c: &'a X509Certificate<'a>) -> Vec<&'a str> {
    c.extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect()
}

fn valid_now(path: &Path, c: &X509Certificate) -> Result<(), MeshError> {
    if !c.validity().is_valid() {
        return Err(bad(
            path,
            format!(
                "is not valid now (valid from {} to {})",
                c.validity().not_before,
                c.validity().not_after
            ),
        ));
    }
    Ok(())
}

fn is_ca(c: &X509Certificate) -> Option<Option<u32>> {
    let bc = c.basic_constraints().ok().flatten()?;
    bc.value.ca.then_some(bc.value.path_len_constraint)
}

fn key_matches(path: &Path, c: &X509Certificate, key_pem: &str) -> Result<(), MeshError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(path, e))?;
    if key.public_key_raw() != &*c.public_key().subject_public_key.data {
        return Err(bad(path, "is not the key of its certificate"));
    }
    Ok(())
}

/// The root of a directory: its trust domain (from the SAN `spiffe://TD`),
/// PEM and key, checked to be a valid self-signed CA with its own key.
pub fn load_root(dir: &Path) -> Result<(TrustDomain, String, String), MeshError> {
    let (cp, kp) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    let pem = read(&cp)?;
    let key = read_key(&kp)?;
    let d = der(&cp, &pem)?;
    let c = parse(&cp, &d)?;
    valid_now(&cp, &c)?;
    if is_ca(&c).is_none() {
        return Err(bad(&cp, "is not a CA certificate"));
    }
    c.verify_signature(None)
        .map_err(|_| bad(&cp, "is not self-signed"))?;
    key_matches(&kp, &c, &key)?;
    let td = trust_domain_of(&cp, &c)?;
    Ok((td, pem, key))
}

fn trust_domain_of(path: &Path, c: &X509Certificate) -> Result<TrustDomain, MeshError> {
    let uri = uris(c)
        .into_iter()
        .find_map(|u| u.strip_prefix("spiffe://"))
        .ok_or_else(|| bad(path, "has no spiffe:// name"))?;
    let td = uri.split('/').next().unwrap_or("");
    TrustDomain::parse(td)
}

/// A host directory for `serve --mesh`, checked: the intermediate is a CA
/// of path length 0, signed by the root here, valid now, limited to the
/// root's trust domain, and its key is its own and private.
pub fn load_host(dir: &Path) -> Result<HostCa, MeshError> {
    let (rp, hp, kp) = (dir.join(ROOT_CERT), dir.join(HOST_CERT), dir.join(HOST_KEY));
    let root_pem = read(&rp)?;
    let host_pem = read(&hp)?;
    let key_pem = read_key(&kp)?;
    let (rd, hd) = (der(&rp, &root_pem)?, der(&hp, &host_pem)?);
    let (root, host) = (parse(&rp, &rd)?, parse(&hp, &hd)?);
    valid_now(&rp, &root)?;
    valid_now(&hp, &host)?;
    if is_ca(&root).is_none() {
        return Err(bad(&rp, "is not a CA certificate"));
    }
    if is_ca(&host) != Some(Some(0)) {
        return Err(bad(&hp, "is not a CA certificate limited to path length 0"));
    }
    host.verify_signature(Some(root.public_key()))
        .map_err(|_| {
            MeshError::Chain(format!(
                "{} is not signed by {}: the intermediate does not chain to this root",
                hp.display(),
                rp.display()
            ))
        })?;
    if host.issuer() != root.subject() {
        return Err(MeshError::Chain(format!(
            "{} names issuer {}, but {} is {}",
            hp.display(),
            host.issuer(),
            rp.display(),
            root.subject()
        )));
    }
    key_matches(&kp, &host, &key_pem)?;
    let td = trust_domain_of(&rp, &root)?;
    let host_id = uris(&host)
        .into_iter()
        .find_map(|u| {
            u.strip_prefix(&format!("{}/host/", td.uri()))
                .map(String::from)
        })
        .ok_or_else(|| bad(&hp, format!("has no name {}/host/<id>", td.uri())))?;
    let constrained = host.extensions().iter().any(|e| {
        e.critical
            && matches!(e.parsed_extension(), ParsedExtension::NameConstraints(nc)
                if nc.permitted_subtrees.as_ref().is_some_and(|p| p.iter().any(
                    |s| matches!(s.base, GeneralName::URI(u) if u == td.as_str()))))
    });
    if !constrained {
        return Err(bad(
            &hp,
            format!(
                "is not limited to URI names in {} (a critical name constraint)",
                td.as_str()
            ),
        ));
    }
    let not_after = host.validity().not_after.to_datetime().into();
    let signer = Signer::new(&host_pem, &key_pem)?;
    Ok(HostCa {
        trust_domain: td,
        host_id,
        root_pem,
        signer,
        not_after,
    })
}

/// The URI names of `leaf_chain_pem`'s first certificate (its identity).
pub fn leaf_names(leaf_chain_pem: &str) -> Result<Vec<String>, MeshError> {
    let p = Path::new("leaf");
    let d = der(p, leaf_chain_pem)?;
    let c = parse(p, &d)?;
    Ok(uris(&c).into_iter().map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::super::ca;
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ed-mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn host_dir(tag: &str, root: &ca::Issued, td: &TrustDomain) -> PathBuf {
        let d = tmp(tag);
        let h = ca::host(&root.cert_pem, &root.key_pem, td, "h1", 365).unwrap();
        write(&d, ROOT_CERT, &root.cert_pem, 0o644);
        write(&d, HOST_CERT, &h.cert_pem, 0o644);
        write(&d, HOST_KEY, &h.key_pem, 0o600);
        d
    }

    #[test]
    fn a_host_directory_loads_and_signs_leaves_in_its_domain() {
        let td = TrustDomain::parse("mesh.test").unwrap();
        let root = ca::root(&td, 10).unwrap();
        let d = host_dir("ok", &root, &td);
        let h = load_host(&d).unwrap();
        assert_eq!(h.trust_domain, td);
        assert_eq!(h.host_id, "h1");
        let leaf = h
            .signer
            .leaf(&td.service("web"), Duration::from_secs(20))
            .unwrap();
        assert_eq!(leaf_names(&leaf.chain_pem).unwrap(), [td.service("web")]);
        assert_eq!(leaf.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        // The leaf is signed by the intermediate that follows it.
        let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(leaf.chain_pem.as_bytes())
            .map(|p| p.unwrap().contents)
            .collect();
        let l = parse(Path::new("l"), &blocks[0]).unwrap();
        let i = parse(Path::new("i"), &blocks[1]).unwrap();
        l.verify_signature(Some(i.public_key())).unwrap();
        assert!(is_ca(&l).is_none());
    }

    #[test]
    fn exposed_keys_foreign_roots_and_wrong_keys_are_refused() {
        let td = TrustDomain::parse("mesh.test").unwrap();
        let root = ca::root(&td, 10).unwrap();
        let d = host_dir("bad", &root, &td);
        std::fs::set_permissions(d.join(HOST_KEY), std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_host(&d).unwrap_err().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        std::fs::set_permissions(d.join(HOST_KEY), std::fs::Permissions::from_mode(0o600)).unwrap();
        // Another root, same trust domain: the chain is broken.
        let other = ca::root(&td, 10).unwrap();
        write(&d, ROOT_CERT, &other.cert_pem, 0o644);
        let e = load_host(&d).unwrap_err().to_string();
        assert!(e.contains("does not chain"), "{e}");
        write(&d, ROOT_CERT, &root.cert_pem, 0o644);
        // A key that is not the intermediate's.
        write(&d, HOST_KEY, &other.key_pem, 0o600);
        let e = load_host(&d).unwrap_err().to_string();
        assert!(e.contains("not the key"), "{e}");
        // Not PEM at all.
        write(&d, HOST_CERT, "hello", 0o644);
        let e = load_host(&d).unwrap_err().to_string();
        assert!(e.contains("not a PEM"), "{e}");
        // A root given where the intermediate goes: not path length 0.
        write(&d, HOST_CERT, &root.cert_pem, 0o644);
        write(&d, HOST_KEY, &root.key_pem, 0o600);
        let e = load_host(&d).unwrap_err().to_string();
        assert!(e.contains("path length 0"), "{e}");
        let e = load_host(&tmp("missing")).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn the_root_directory_loads_with_its_trust_domain() {
        let td = TrustDomain::parse("corp").unwrap();
        let root = ca::root(&td, 10).unwrap();
        let d = tmp("root");
        write(&d, ROOT_CERT, &root.cert_pem, 0o644);
        write(&d, ROOT_KEY, &root.key_pem, 0o600);
        let (got, _, _) = load_root(&d).unwrap();
        assert_eq!(got, td);
    }
}
