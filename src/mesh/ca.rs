//! Issuing the mesh's certificates with `rcgen`: the root, a host
//! intermediate, and leaves. Every key is ECDSA P-256; every certificate
//! gets a random 128-bit serial. Returns PEM text; writing files is the
//! caller's (`ca` role).

use super::{check_segment, MeshError, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A leaf: its chain (leaf, then the host intermediate), its key, and
/// when it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub id: String,
    pub chain_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// OID of the X.509 name constraints extension (RFC 5280, 4.2.1.10).
const NAME_CONSTRAINTS: &[u64] = &[2, 5, 29, 30];

fn serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    // Positive, and never all zero.
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

fn at(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn uri(s: String) -> Result<SanType, MeshError> {
    Ok(SanType::URI(s.try_into()?))
}

fn name(cn: String) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "envoy-docker mesh");
    dn.push(DnType::CommonName, cn);
    dn
}

/// The DER of a name constraints extension that permits URI names whose
/// host is `td` only, written with `yasna`'s DER writer.
fn uri_constraint(td: &TrustDomain) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            // permittedSubtrees [0] IMPLICIT GeneralSubtrees
            w.next().write_tagged_implicit(yasna::Tag::context(0), |w| {
                w.write_sequence(|w| {
                    // GeneralSubtree { base: uniformResourceIdentifier [6] }
                    w.next().write_sequence(|w| {
                        w.next().write_tagged_implicit(yasna::Tag::context(6), |w| {
                            w.write_ia5_string(td.as_str())
                        });
                    });
                });
            });
        });
    })
}

/// A new root for `td`, valid from now for `days`.
pub fn root(td: &TrustDomain, days: u32) -> Result<Issued, MeshError> {
    let key = KeyPair::generate()?;
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = name(format!("{} root", td.as_str()));
    p.subject_alt_names = vec![uri(td.uri())?];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = at(now - Duration::from_secs(300));
    p.not_after = at(now + Duration::from_secs(u64::from(days) * 86_400));
    p.serial_number = Some(serial());
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A host intermediate for `host_id`, signed by the root (`root_cert_pem`,
/// `root_key_pem`), valid from now for `days`: a CA of path length 0 whose
/// names are limited to URIs in `td`.
pub fn host(
    root_cert_pem: &str,
    root_key_pem: &str,
    td: &TrustDomain,
    host_id: &str,
    days: u32,
) -> Result<Issued, MeshError> {
    check_segment("host id", host_id)?;
    let root_key = KeyPair::from_pem(root_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(root_cert_pem, &root_key)?;
    let key = KeyPair::generate()?;
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = name(format!("{} host {host_id}", td.as_str()));
    p.subject_alt_names = vec![uri(td.host(host_id))?];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut nc = CustomExtension::from_oid_content(NAME_CONSTRAINTS, uri_constraint(td));
    nc.set_criticality(true);
    p.custom_extensions = vec![nc];
    p.use_authority_key_identifier_extension = true;
    p.not_before = at(now - Duration::from_secs(300));
    p.not_after = at(now + Duration::from_secs(u64::from(days) * 86_400));
    p.serial_number = Some(serial());
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Signs leaves with one host intermediate.
pub struct Signer {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Signer, MeshError> {
        let key = KeyPair::from_pem(key_pem)?;
        // Parsed once here, so that a bad file fails at start.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(Signer {
            cert_pem: cert_pem.into(),
            key,
        })
    }

    /// A leaf for SPIFFE id `id`, valid from `not_before` to `not_after`
    /// (a test may ask for one already expired).
    pub fn leaf_between(
        &self,
        id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, MeshError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![uri(id.into())?];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = at(not_before);
        p.not_after = at(not_after);
        p.serial_number = Some(serial());
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Leaf {
            id: id.into(),
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// A leaf for `id` valid from now for `ttl` (from a minute back, for
    /// clocks that differ a little between hosts).
    pub fn leaf(&self, id: &str, ttl: Duration) -> Result<Leaf, MeshError> {
        let now = SystemTime::now();
        self.leaf_between(id, now - Duration::from_secs(60), now + ttl)
    }
}
