//! What the mesh ingress tells about its callers: Envoy's gRPC access-log
//! service (ALS), served next to ADS on the same socket, and `classify`,
//! which turns each entry into a [`MeshEvent`] for the registrar's
//! counters (handshakes and RBAC denials, per service and caller), which
//! it hands to a sink.
//!
//! `mesh_in` logs one TCP entry per connection when it closes (a listener
//! access log, so also for handshakes that failed), and its HTTP chains one
//! entry per request answered 403. Only counts come of it: a lost or
//! hostile stream loses counts, and never touches a connection.

use envoy_types::pb::envoy::data::accesslog::v3::{
    tls_properties::certificate_properties::subject_alt_name::San, AccessLogCommon,
};
use envoy_types::pb::envoy::service::accesslog::v3::{
    access_log_service_server::AccessLogService, stream_access_logs_message::LogEntries,
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// The log name the mesh ingress's entries carry.
pub const LOG_NAME: &str = "envoy_docker_mesh";

/// What became of one call to the mesh ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// A TLS handshake completed with a client certificate.
    Handshake,
    /// The handshake failed, or came without a certificate.
    Failed,
    /// RBAC refused the caller (a 403, or the connection closed).
    Denied,
}

/// One call: the SNI it asked for, the caller's SPIFFE id (none without a
/// certificate), and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEvent {
    pub sni: String,
    pub caller: Option<String>,
    pub outcome: Outcome,
}

const RBAC_DENIED: &str = "rbac_access_denied";

fn parties(c: &AccessLogCommon) -> (String, Option<String>) {
    let Some(tls) = &c.tls_properties else {
        return (String::new(), None);
    };
    let caller = tls.peer_certificate_properties.as_ref().and_then(|p| {
        p.subject_alt_name.iter().find_map(|s| match &s.san {
            Some(San::Uri(u)) if u.starts_with("spiffe://") => Some(u.clone()),
            _ => None,
        })
    });
    (tls.tls_sni_hostname.clone(), caller)
}

/// The events in one message from Envoy; entries of other logs, and
/// entries without what they need, give none.
pub fn classify(msg: &StreamAccessLogsMessage) -> Vec<MeshEvent> {
    let mut out = Vec::new();
    match &msg.log_entries {
        Some(LogEntries::TcpLogs(t)) => {
            for e in &t.log_entry {
                let Some(c) = &e.common_properties else {
                    continue;
                };
                let (sni, caller) = parties(c);
                let failed = !c.downstream_transport_failure_reason.is_empty() || caller.is_none();
                let outcome = if failed {
                    Outcome::Failed
                } else {
                    Outcome::Handshake
                };
                let denied = c.connection_termination_details.starts_with(RBAC_DENIED);
                out.push(MeshEvent {
                    sni: sni.clone(),
                    caller: caller.clone(),
                    outcome,
                });
                if denied {
                    out.push(MeshEvent {
                        sni,
                        caller,
                        outcome: Outcome::Denied,
                    });
                }
            }
        }
        Some(LogEntries::HttpLogs(h)) => {
            for e in &h.log_entry {
                let denied = e
                    .response
                    .as_ref()
                    .is_some_and(|r| r.response_code_details.starts_with(RBAC_DENIED));
                let Some(c) = e.common_properties.as_ref().filter(|_| denied) else {
                    continue;
                };
                let (sni, caller) = parties(c);
                out.push(MeshEvent {
                    sni,
                    caller,
                    outcome: Outcome::Denied,
                });
            }
        }
        None => {}
    }
    out
}

/// Where classified events go (the server hands them to `Control::mesh`).
pub type Sink = Arc<dyn Fn(MeshEvent) + Send + Sync>;

/// The ALS service: each stream's entries, classified, go to `sink`.
/// Envoy never ends these streams, so each ends when `closing` turns
/// true, or the server's graceful shutdown would wait for ever.
pub struct Als {
    pub sink: Sink,
    pub closing: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AccessLogService for Als {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut closing = self.closing.clone();
        // Only the first message of a stream names its log.
        let mut ours = false;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = closing.wait_for(|c| *c) => None,
            };
            let Some(msg) = msg else { break };
            if let Some(id) = &msg.identifier {
                ours = id.log_name == LOG_NAME;
            }
            if ours {
                for e in classify(&msg) {
                    (self.sink)(e);
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        tls_properties::{certificate_properties::SubjectAltName, CertificateProperties},
        HttpAccessLogEntry, HttpResponseProperties, TcpAccessLogEntry, TlsProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, TcpAccessLogEntries,
    };

    fn common(caller: Option<&str>, failure: &str, termination: &str) -> AccessLogCommon {
        AccessLogCommon {
            tls_properties: Some(TlsProperties {
                tls_sni_hostname: "web.td".into(),
                peer_certificate_properties: caller.map(|c| CertificateProperties {
                    subject_alt_name: vec![
                        SubjectAltName {
                            san: Some(San::Dns("ignored".into())),
                        },
                        SubjectAltName {
                            san: Some(San::Uri(c.into())),
                        },
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            downstream_transport_failure_reason: failure.into(),
            connection_termination_details: termination.into(),
            ..Default::default()
        }
    }

    fn tcp(entries: Vec<AccessLogCommon>) -> StreamAccessLogsMessage {
        StreamAccessLogsMessage {
            log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
                log_entry: entries
                    .into_iter()
                    .map(|c| TcpAccessLogEntry {
                        common_properties: Some(c),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn connections_are_handshakes_failures_or_denials() {
        let caller = "spiffe://td/svc/frontend";
        let got = classify(&tcp(vec![
            common(Some(caller), "", ""),
            common(None, "TLS_error: certificate required", ""),
            common(Some(caller), "", "rbac_access_denied_matched_policy[none]"),
            AccessLogCommon::default(),
        ]));
        let outcomes: Vec<_> = got.iter().map(|e| e.outcome).collect();
        use Outcome::*;
        assert_eq!(outcomes, [Handshake, Failed, Handshake, Denied, Failed]);
        assert_eq!(got[0].sni, "web.td");
        assert_eq!(got[0].caller.as_deref(), Some(caller));
        assert_eq!(got[1].caller, None);
        assert_eq!(got[4].sni, "");
    }

    #[test]
    fn only_rbac_403s_count_as_denials() {
        let entry = |details: &str| HttpAccessLogEntry {
            common_properties: Some(common(Some("spiffe://td/host/h"), "", "")),
            response: Some(HttpResponseProperties {
                response_code_details: details.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let msg = StreamAccessLogsMessage {
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: vec![
                    entry("via_upstream"),
                    entry("rbac_access_denied_matched_policy[none]"),
                    HttpAccessLogEntry::default(),
                ],
            })),
            ..Default::default()
        };
        let got = classify(&msg);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].outcome, Outcome::Denied);
        assert_eq!(got[0].caller.as_deref(), Some("spiffe://td/host/h"));
        assert!(classify(&StreamAccessLogsMessage::default()).is_empty());
    }
}
