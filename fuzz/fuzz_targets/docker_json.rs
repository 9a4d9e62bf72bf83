//! What the Docker API may answer: container lists, inspect documents and
//! network settings as JSON, and the raw event stream cut anywhere.
#![no_main]

use envoy_docker::registrar::docker::client::EventLines;
use envoy_docker::registrar::docker::{api, meta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Each answer as the client reads it: into its struct, then into a
    // container's metadata.
    if let Ok(v) = serde_json::from_slice::<api::ContainerSummary>(data) {
        if let Ok(m) = meta::from_list_item(&v) {
            let _ = m.naming();
            let _ = m.label_problems();
            let port = u16::from_le_bytes([data[0], data[data.len() - 1]]);
            let _ = m.mode_for(port);
            let _ = m.proxy_protocol();
        }
    }
    if let Ok(v) = serde_json::from_slice::<api::ContainerInspect>(data) {
        if let Ok(m) = meta::from_inspect(&v) {
            let _ = m.naming();
            let _ = m.label_problems();
        }
    }
    if let Ok(v) = serde_json::from_slice::<api::Network>(data) {
        let _ = meta::container_with_ip(&v, "172.17.0.2".parse().unwrap());
    }
    // The event stream in two pieces, split where the first byte says.
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut lines = EventLines::default();
    lines.push(&data[..cut]);
    while lines.next_event().is_some() {}
    lines.push(&data[cut..]);
    while lines.next_event().is_some() {}
});
