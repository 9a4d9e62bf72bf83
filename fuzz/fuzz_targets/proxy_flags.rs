//! docker-proxy's flags as dockerd (or anyone) may pass them, split on NUL
//! bytes into arguments, and the same argv as the /proc scan reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = data
        .split(|b| *b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    let _ = envoy_docker::cmdline::parse(&args);
    let _ = envoy_docker::procscan::proxy_mapping(&args, true);
    let _ = envoy_docker::procscan::proxy_mapping(&args, false);
});
